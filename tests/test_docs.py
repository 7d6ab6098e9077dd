"""Every pipeline command the README and the configs document is accepted as written: its overrides
compose against the pipeline's config (what `--cfg job` checks; a multirun's first job), without running
the job."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from cleandiff_rl.training import compose_config

REPO = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"python pipelines/(\w+)\.py([^\n`#|]*)")


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, overrides) for each `python pipelines/<script>.py ...` in README.md and configs/."""
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "configs").rglob("*.yaml"))]:
        text = path.read_text().replace("\\\n", " ")
        for match in COMMAND.finditer(text):
            found.append((f"{path.relative_to(REPO)}: {match.group(0).strip()}", match.group(1),
                          shlex.split(match.group(2))))
    return found


def first_job(overrides: list[str]) -> list[str]:
    """A multirun command's (`-m`) first job: each sweep `key=a,b,...` at its first value."""
    if "-m" not in overrides:
        return overrides
    parser = OverridesParser.create()
    job = []
    for text in overrides:
        if text == "-m":
            continue
        override = parser.parse_override(text)
        job.append(f"{override.get_key_element()}={next(override.sweep_string_iterator())}"
                   if override.is_sweep_override() else text)
    return job


def config_name(script: str) -> str:
    source = (REPO / "pipelines" / f"{script}.py").read_text()
    return re.search(r'@hydra\.main\([^)]*config_name="(\w+)"', source).group(1)  # not another compose's


@pytest.mark.parametrize("where,script,overrides", documented_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_documented_command_composes(where: str, script: str, overrides: list[str]):
    assert (REPO / "pipelines" / f"{script}.py").is_file(), where
    compose_config(first_job(overrides), config_name=config_name(script))
