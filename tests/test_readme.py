"""The README's configuration reference names every setting there is, and no other."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from worker.settings import ENV_PREFIX, AccountSettings, Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def setting_variables(model: type[BaseModel] = Settings, prefix: str = ENV_PREFIX) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        inner = field.annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            names |= setting_variables(inner, f"{prefix}{name}__")
        elif model is Settings and name == "accounts":  # SMSC_ACCOUNTS__<NAME>__<FIELD>
            names |= {
                f"{prefix}{name}__<NAME>__{field_name}".upper()
                for field_name in AccountSettings.model_fields
            }
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def test_the_configuration_reference_lists_every_setting() -> None:
    documented = set(re.findall(r"^\| `(SMSC_[A-Z0-9_<>]+)` \|", README.read_text(), re.MULTILINE))
    assert documented == setting_variables()
