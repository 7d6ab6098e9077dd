"""Every pipeline command the README, docs/ and the configs document is accepted as written: its overrides
compose against the pipeline's config (what `--cfg job` checks; a multirun's first job), without running
the job. Every link between those pages reaches a file and, where it names one, a heading."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from cleandiff_rl.training import compose_config
from cleandiff_rl.validation import validate

REPO = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"python pipelines/(\w+)\.py([^\n`#|]*)")
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\((?!https?://)([^)#\s]*)(?:#([^)\s]+))?\)")


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, overrides) for each `python pipelines/<script>.py ...` in README.md, docs/ and configs/."""
    found = []
    for path in [*PAGES, *sorted((REPO / "configs").rglob("*.yaml"))]:
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
    return re.search(r'^@pipeline\("(\w+)"\)', source, flags=re.M).group(1)  # not another compose's


@pytest.mark.parametrize("where,script,overrides", documented_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_documented_command_composes(where: str, script: str, overrides: list[str]):
    assert (REPO / "pipelines" / f"{script}.py").is_file(), where
    validate(compose_config(first_job(overrides), config_name=config_name(script)), config_name(script))


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings: lower case, punctuation dropped, spaces to hyphens.
    A `#` line inside a fenced code block is a shell comment, not a heading."""
    prose = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    headings = re.findall(r"^#+ (.+)$", prose, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_links_between_pages_resolve(page: Path):
    for target, anchor in LINK.findall(page.read_text()):
        linked = (page.parent / target).resolve() if target else page
        assert linked.exists(), f"{page.name}: link to missing {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name}: no heading #{anchor} in {linked.name}"
