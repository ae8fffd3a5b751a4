"""The README stays in step with the code."""

from __future__ import annotations

import re
from pathlib import Path

from watibot.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_readme_documents_every_setting() -> None:
    """Every setting appears in the README's configuration table, and the table names no setting that is gone."""
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(WATIBOT_[A-Z_]+)` \|", readme, flags=re.MULTILINE))
    expected = {f"WATIBOT_{name.upper()}" for name in Settings.model_fields}
    assert documented == expected


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run calls exactly the test command the README gives."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```sh\n(.+?)\n```", readme)
    test_command = commands[1]
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()
