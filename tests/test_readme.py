"""The README's configuration reference names every setting there is, and no other."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from worker.settings import ENV_PREFIX, AccountSettings, Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def setting_variables() -> set[str]:
    names = set()
    for group, field in Settings.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            names |= {f"{ENV_PREFIX}{group}__{name}".upper() for name in model.model_fields}
        elif group == "accounts":  # named entries: SMSC_ACCOUNTS__<NAME>__<FIELD>
            names |= {
                f"{ENV_PREFIX}{group}__<NAME>__{name}".upper()
                for name in AccountSettings.model_fields
            }
        else:
            names.add(f"{ENV_PREFIX}{group}".upper())
    return names


def test_the_configuration_reference_lists_every_setting() -> None:
    documented = set(re.findall(r"^\| `(SMSC_[A-Z0-9_<>]+)` \|", README.read_text(), re.MULTILINE))
    assert documented == setting_variables()
