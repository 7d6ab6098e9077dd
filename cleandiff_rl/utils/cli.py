"""The pipelines' command line: one entry point, and one line for every mistake a user can type.

Each pipeline's `main` is decorated with `@pipeline("<config name>")` in place of `@hydra.main`. Before
Hydra starts, it composes the config the command line asks for with Hydra's compose API (with -m, once
for every value of each swept setting) and checks every setting against `cleandiff_rl.validation`; each
job checks its config again before the pipeline runs. A user's mistake (an unknown config group value,
an override Hydra cannot read, an unknown setting, a value of the wrong type or out of range, an unknown
solver or algorithm, a missing or unreadable file, and any `USER_ERRORS` the pipeline raises) prints one
line `error: <the bad value; what is accepted>` (under 200 characters) on stderr and exits with 2, before
any folder or file is made. Hydra's own flags (-m/--multirun, --help, --cfg, --info, ...) work as before;
HYDRA_FULL_ERROR=1 (Hydra's own switch) shows the full traceback instead of the line.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException,
                              ValidationError)

from cleandiff_rl.validation import rule_for, validate

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # the repository's configs/ links here
LIMIT = 199  # characters of the whole `error: ...` line
MAX_SWEEP_CHECKS = 64  # configs a -m command composes to check its swept values before Hydra launches

# What a user can cause by what they type: bad values, missing or unreadable files or settings, unbuilt datasets.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
               NotADirectoryError, MissingMandatoryValue)
# What composing a config from the command line raises for a bad override, group value, key or type.
COMMAND_LINE_ERRORS = (*USER_ERRORS, HydraException, OmegaConfBaseException)


def fit(text: str, room: int = LIMIT - len("error: ")) -> str:
    """`text` on one line within `room` characters; a list that runs over ends in ', ...'."""
    text = " ".join(str(text).split())
    if len(text) <= room:
        return text
    cut = text.rfind(", ", 0, room - 5)
    return text[:cut] + ", ..." if cut > room // 2 else text[:room - 3] + "..."


def _first_line(text: str) -> str:
    return str(text).strip().splitlines()[0] if str(text).strip() else ""


def _omegaconf_message(error: OmegaConfBaseException) -> str:
    """An OmegaConf error (from an override or a field's type) as what is wrong with which setting."""
    full_key = getattr(error, "full_key", None) or ""
    if isinstance(error, (ConfigAttributeError, ConfigKeyError)) and full_key:
        parent = getattr(error, "parent_node", None)
        siblings = [str(k) for k in parent.keys() if k != "hydra"] if isinstance(parent, DictConfig) else []
        prefix = full_key.rpartition(".")[0]
        prefix = prefix + "." if prefix else ""
        close = difflib.get_close_matches(str(getattr(error, "key", full_key)), siblings, n=3)
        if close:
            return f"unknown setting {full_key!r}; did you mean {', '.join(prefix + c for c in close)}?"
        valid = f"valid: {', '.join(siblings)}" if siblings else "`--cfg job` lists every setting"
        return f"unknown setting {full_key!r}; {valid}"
    if isinstance(error, ValidationError) and full_key:
        rule = rule_for("", [k for k in full_key.split(".") if not k.startswith("[")])
        value = getattr(error, "value", None)
        if rule is not None and value is not None:
            return f"{full_key}={value!r} is not {'an integer' if rule.kind == 'int' else 'a number'}; " \
                   f"accepted: {rule.describe()}"
    message = _first_line(getattr(error, "msg", None) or str(error))
    return f"{full_key}: {message}" if full_key and full_key not in message else message


def message(error: BaseException) -> str:
    """The one line (without `error: `) that reports `error`, one of `COMMAND_LINE_ERRORS`."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options is not None:
        group, _, value = error.missing_cfg_file.rpartition("/")
        text = f"unknown {group or 'config'} {value!r}; valid: {', '.join(error.options)}"
    elif isinstance(error, OverrideParseException):
        text = f"cannot read the override {error.override!r} ({_first_line(error.message)}); " \
               "write key=value, key=[a,b] for a list"
    elif isinstance(error, ConfigCompositionException) and isinstance(error.__cause__, OmegaConfBaseException):
        text = _omegaconf_message(error.__cause__)
    elif isinstance(error, ConfigCompositionException) and str(error).startswith("Ambiguous value"):
        text = f"{_first_line(error)}: a list is key=[a,b]; to run each value, add -m"
    elif isinstance(error, OmegaConfBaseException):
        text = _omegaconf_message(error)
    elif isinstance(error, HydraException):  # the first line, and the next where it ends in ':'
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else _first_line(error)
    else:
        text = str(error)
    return fit(text)


@contextlib.contextmanager
def reported(errors: tuple[type[BaseException], ...] = USER_ERRORS) -> Iterator[None]:
    """Turn `errors` raised inside into one line `error: ...` on stderr and exit code 2
    (HYDRA_FULL_ERROR=1: raise them as they are)."""
    try:
        yield
    except errors as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {message(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def user_errors(main: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap a task function: a `USER_ERRORS` exception prints `error: <message>` on stderr and exits with 2."""

    @functools.wraps(main)
    def wrapper(cfg: Any) -> Any:
        with reported():
            return main(cfg)

    return wrapper


def command(argv: list[str]) -> tuple[str | None, list[str]]:
    """('run' | 'multirun' | 'cfg', overrides) of a pipeline's command line; (None, []) for one with any
    other flag (--help, --info, --config-name, ...), which Hydra alone handles."""
    mode, overrides, args = "run", [], iter(argv)
    for arg in args:
        if arg in ("-m", "--multirun"):
            mode = "multirun" if mode == "run" else mode
        elif arg in ("-c", "--cfg", "-p", "--package"):
            mode = "cfg" if arg in ("-c", "--cfg") else mode
            next(args, None)
        elif arg.startswith(("--cfg=", "--package=")) or arg in ("-r", "--run", "--resolve"):
            mode = "cfg" if arg.startswith("--cfg=") else mode
        elif arg.startswith("-"):
            return None, []
        else:
            overrides.append(arg)
    return mode, overrides


def swept(overrides: list[str]) -> list[list[str]] | None:
    """The override lists that give every value of every swept setting (`key=a,b`, `key=range(0,3)`) once,
    the others at their first value; None for a sweep Hydra's basic sweeper cannot list (`interval`)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for override in parsed:
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices.append([f"{key}={override.get_value_element_as_str()}"])
        elif override.is_discrete_sweep():
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            return None
    first = [values[0] for values in choices if values]
    jobs = [first]
    for i, values in enumerate(choices):
        jobs += [first[:i] + [value] + first[i + 1:] for value in values[1:]]
    return jobs[:MAX_SWEEP_CHECKS]


def precheck(config_name: str, mode: str, overrides: list[str]) -> None:
    """Compose `config_name` with the command line's `overrides` and validate it (each swept value with -m;
    composing alone for --cfg), raising what is wrong before Hydra makes anything."""
    jobs = swept(overrides) if mode == "multirun" else [overrides]
    if jobs is None:
        return
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3", job_name=config_name):
        for job in jobs:
            cfg = compose(config_name, overrides=job)
            if mode != "cfg":
                validate(cfg, config_name)


def pipeline(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[..., Any]]:
    """`@hydra.main` for `configs/<config_name>.yaml` with the error contract of this module: the command
    line is checked first (`precheck`), then each job's config (`validate`) before `main` runs."""

    def decorate(main: Callable[[DictConfig], Any]) -> Callable[..., Any]:
        @functools.wraps(main)  # Hydra names the job after the function it unwraps: the pipeline's file
        def task(cfg: DictConfig) -> Any:
            with reported():
                validate(cfg, config_name)
                return main(cfg)

        hydra_main = hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(task)

        @functools.wraps(main)
        def entry(cfg_passthrough: DictConfig | None = None) -> Any:
            if cfg_passthrough is None:
                mode, overrides = command(sys.argv[1:])
                if mode is not None:
                    with reported(COMMAND_LINE_ERRORS):
                        precheck(config_name, mode, overrides)
            return hydra_main(cfg_passthrough)

        return entry

    return decorate
