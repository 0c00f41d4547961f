"""Prometheus's own checker, promtool, run as a subprocess (scripts/ensure-promtool installs
it; `make test` runs that first)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing: run scripts/ensure-promtool (make test does)")
    return subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def check_rules(groups: list[dict[str, Any]]) -> None:
    """`promtool check rules` on a rules file holding these groups: every expression parses,
    every alert and record is well formed."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "rules.yml"
        path.write_text(yaml.safe_dump({"groups": groups}))
        checked = promtool("check", "rules", path.name, cwd=path.parent)
    assert checked.returncode == 0, checked.stdout + checked.stderr
