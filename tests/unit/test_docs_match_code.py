"""The README and docs/ say what the code does: every setting is documented, every example request works as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CODE_BLOCK = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M)
DATA_OPTIONS = {"-d", "--data", "--data-raw", "--data-binary", "--data-ascii"}
HEADER_OPTIONS = {"-H", "--header"}


def _docs() -> dict[str, str]:
    return {path.name: path.read_text(encoding="utf-8") for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]}


def _curl_commands() -> list[list[str]]:
    """Every `curl` command in the docs' code blocks, continuation lines joined, split as a shell would."""
    commands = []
    for text in _docs().values():
        for block in CODE_BLOCK.findall(text):
            for line in block.replace("\\\n", " ").splitlines():
                if line.lstrip().startswith("curl "):
                    commands.append(shlex.split(line, comments=True))
    return commands


def _sends_json_content_type(command: list[str]) -> bool:
    headers = [value for option, value in zip(command, command[1:], strict=False) if option in HEADER_OPTIONS]
    return "--json" in command or any(re.fullmatch(r"(?i)content-type:\s*application/json", h) for h in headers)


def test_every_curl_example_that_sends_a_body_declares_it_json() -> None:
    """`curl -d '{...}'` sends application/x-www-form-urlencoded: the admin examples were all answered 422."""
    commands = _curl_commands()
    with_body = [command for command in commands if DATA_OPTIONS & set(command)]
    assert len(with_body) >= 3, commands  # the admin examples are found at all
    assert [" ".join(c) for c in with_body if not _sends_json_content_type(c)] == []


def test_every_setting_is_documented_by_its_environment_name() -> None:
    text = "\n".join(_docs().values())
    missing = [name for field in Settings.model_fields
               if not re.search(rf"{(name := f'GOVRAG_{field.upper()}')}(?![A-Z0-9_])", text)]
    assert missing == [], f"document these in README.md's settings table or docs/: {missing}"


def test_the_readme_names_every_revision_whose_downgrade_refuses_to_lose_data() -> None:
    """The README's list of what a downgrade refuses to lose left out 0011 (approved levels held for review), which
    `data_at_risk` guards: the revisions it names are those whose migration defines one."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = re.search(r"A downgrade \(Alembic's.*?the error names the revision", readme, re.S)
    assert listed is not None, "README.md's paragraph on refused downgrades moved: update this test"
    guarded = {path.name[:4] for path in (ROOT / "migrations" / "versions").glob("[0-9][0-9][0-9][0-9]_*.py")
               if re.search(r"^def data_at_risk\(", path.read_text(encoding="utf-8"), re.M)}
    assert len(guarded) >= 9, guarded  # the migrations are found at all
    assert set(re.findall(r"\b\d{4}\b", listed.group(0))) == guarded
