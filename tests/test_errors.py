"""Every pipeline's error contract: each numeric setting of every config has a checked range, and a user's
mistake is one `error:` line under 200 characters, exit code 2, with nothing left behind."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from offline_data import random_dataset
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cleandiff_rl.agents import ALGORITHMS
from cleandiff_rl.training import register_configs
from cleandiff_rl.utils.cli import CONFIG_DIR, command, fit, message, swept
from cleandiff_rl.validation import NAMES, leaves, problems, rule_for, validate

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
# Settings whose null is not a number: a text or a path, or null for "the default" of a text setting.
TEXT_SETTINGS = {"env_id", "follow", "datasets_root", "dataset", "author", "author_email", "selection", "acting",
                 "report"}


def configs() -> list[tuple[str, list[str]]]:
    """(config name, overrides) of every pipeline config, once per option of each config group it composes
    (algo, task, suite, make_dataset presets), the other groups at their defaults."""
    register_configs()
    found = []
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        for path in sorted(CONFIG_DIR.glob("*.yaml")):
            choices = compose(path.stem, return_hydra_config=True).hydra.runtime.choices
            groups = [group for group in choices if not group.startswith("hydra") and (CONFIG_DIR / group).is_dir()]
            found += [(path.stem, [f"{group}={option.stem}"]) for group in groups
                      for option in sorted((CONFIG_DIR / group).glob("*.yaml"))] or [(path.stem, [])]
    return found


def composed(name: str, overrides: list[str]) -> DictConfig:
    register_configs()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(name, overrides=overrides)


def numeric_settings(cfg: DictConfig) -> list[tuple[list[str], str, object]]:
    """(keys, dotted name, value) of every leaf that is a number, a list of numbers, or null."""
    found = []
    for path, shown, value in leaves(cfg, []):
        items = list(value) if isinstance(value, ListConfig) else [value]
        if value is None or any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            found.append((path, shown, value))
    return found


def out_of_range(rule) -> object:
    """A value `rule` refuses: just below its lower bound, above its upper one, else not finite."""
    if rule.low is not None:
        bad = rule.low if rule.low_open else rule.low - (1 if rule.kind == "int" else 0.5)
    elif rule.high is not None:
        bad = rule.high if rule.high_open else rule.high + 1
    else:
        bad = float("nan")
    return [bad] if rule.shape == "list" else bad


CONFIGS = configs()


@pytest.mark.parametrize("name,overrides", CONFIGS, ids=[" ".join([n, *o]) for n, o in CONFIGS])
def test_every_numeric_setting_has_a_range_that_refuses_a_bad_value(name, overrides):
    cfg = composed(name, overrides)
    assert problems(cfg, name) == []  # the shipped defaults are valid
    settings = numeric_settings(cfg)
    assert len(settings) >= 2  # the walk reaches the numbers (aggregate has two)
    for path, shown, value in settings:
        rule = rule_for(name, path)
        if rule is None:  # only a null text setting or a null solver may go without a range
            assert value is None and (path[-1] in TEXT_SETTINGS or path[-1] in NAMES), f"{name}: no range for {shown}"
            continue
        bad = copy.deepcopy(cfg)
        OmegaConf.update(bad, shown, out_of_range(rule), merge=False)
        found = problems(bad, name)
        assert any(p.startswith(f"{shown}=") or p.startswith(f"{shown}[0]=") for p in found), (name, shown, found)
        with pytest.raises(ValueError):
            validate(bad, name)
        if not rule.none:  # null is no number either
            try:
                OmegaConf.update(bad, shown, None, merge=False)
            except OmegaConfBaseException:  # a typed algorithm setting refuses null itself
                continue
            assert any(p.startswith(f"{shown}=null") for p in problems(bad, name)), (name, shown)


def test_the_validator_refuses_text_for_a_number_unknown_names_and_numbers_without_a_range():
    cfg = composed("train", ["algo=dql"])
    cfg.batch_size = "abc"
    assert problems(cfg, "train") == ["batch_size='abc' is not a number; accepted: an integer >= 1"]
    cfg = composed("sweep", ["checkpoint=x.pt", "solvers=[ddim,nope]", "steps=[5,0]"])
    assert problems(cfg, "sweep")[0].startswith("unknown solver 'nope' in solvers; valid: ddpm, ddim")
    assert problems(cfg, "sweep")[1] == "steps[1]=0 is out of range; accepted: a list of integers >= 1"
    cfg = composed("evaluate", ["checkpoint=x.pt", "+settings.new_knob=3"])
    assert problems(cfg, "evaluate") == ["settings.new_knob=3: no valid range is known for this setting"]
    cfg = composed("benchmark_suite", ["+params.idql.num_candidates=0", "algos=[idql,nope]"])
    assert problems(cfg, "benchmark_suite") == [
        f"unknown algorithm 'nope' in algos; valid: {', '.join(ALGORITHMS)}",
        "params.idql.num_candidates=0 is out of range; accepted: an integer >= 1"]
    assert problems(composed("evaluate", ["checkpoint=x.pt", "steps=null", "temperature=0"]), "evaluate") == []


def test_hydra_errors_become_one_short_line():
    long_error = MissingConfigException("Could not find 'task/nope'\n\nAvailable ...", "task/nope",
                                        [f"option-{i}" for i in range(40)])
    line = "error: " + message(long_error)
    assert line.startswith("error: unknown task 'nope'; valid: option-0, option-1") and line.endswith(", ...")
    assert len(line) < 200 and "\n" not in line
    assert fit("a\nb   c") == "a b c" and len(fit("x" * 500)) == 199 - len("error: ")
    with pytest.raises(Exception) as error:
        composed("train", ["algo.params.lr=abc"])
    assert message(error.value) == "algo.params.lr='abc' is not a number; accepted: a number > 0"


def test_the_command_line_is_read_as_hydra_reads_it():
    assert command(["algo=dql", "steps=5"]) == ("run", ["algo=dql", "steps=5"])
    assert command(["-m", "seed=0,1"]) == ("multirun", ["seed=0,1"])
    assert command(["--cfg", "job", "steps=5"]) == ("cfg", ["steps=5"])
    assert command(["--help"]) == (None, []) and command(["--info", "defaults"]) == (None, [])
    # each swept value once, the others at their first: 4 configs checked for a grid of 2 x 3 jobs
    assert swept(["algo=dql,idql", "seed=range(0,3)", "steps=5"]) == [
        ["algo=dql", "seed=0", "steps=5"], ["algo=idql", "seed=0", "steps=5"],
        ["algo=dql", "seed=1", "steps=5"], ["algo=dql", "seed=2", "steps=5"]]


def run(tmp_path: Path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "MINARI_DATASETS_PATH": str(tmp_path / "minari"), **env}
    if "HYDRA_FULL_ERROR" not in env:
        environ.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(PIPELINES / f"{script}.py"), *args], cwd=tmp_path, env=environ,
                          capture_output=True, text=True)


@pytest.mark.parametrize("script,args,line", [
    ("train", ["algo=nonexistent"], "error: unknown algo 'nonexistent'; valid: bc, dac, decision_diffuser, diffuser, "),
    ("train", ["algo=dql", "dataset=test/hopper/random-v0", "steps=-5"],
     "error: steps=-5 is out of range; accepted: an integer >= 1"),
    ("train", ["algo=dql", "batch_size=abc"], "error: batch_size='abc' is not a number; accepted: an integer >= 1"),
    ("train", ["-m", "algo=dql,idql", "seed=0,-1"], "error: seed=-1 is out of range; accepted: an integer in [0, "),
    ("train", ["algo=dql", "steps=[1,"], "error: cannot read the override 'steps=[1,' (no viable alternative"),
    ("sweep", ["checkpoint=policy.pt", "solvers=[ddim,rk4]"], "error: unknown solver 'rk4' in solvers; valid: ddpm, "),
    ("benchmark_suite", ["datasets=[hopper-nope]"], "error: unknown dataset 'hopper-nope': neither a task ("),
    ("benchmark_suite", ["algos=[dac]", "steps.dac=3000"],
     "error: steps.dac=3000 keeps fewer than the last 3 checkpoints (checkpoint_every.dac=2000) the suite evaluates"),
    ("distill", ["checkpoint=missing.pt", "nfe=0"], "error: nfe=0 is out of range; accepted: an integer >= 1"),
])
def test_a_mistake_is_one_line_exit_2_and_leaves_nothing(tmp_path, monkeypatch, script, args, line):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    random_dataset("test/hopper/random-v0", n_steps=200)
    (tmp_path / "policy.pt").write_bytes(b"not read: the solver is refused first")
    before = sorted(tmp_path.rglob("*"))
    done = run(tmp_path, script, *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(line) and len(done.stderr.splitlines()) == 1, done.stderr
    assert len(done.stderr.rstrip("\n")) < 200
    assert sorted(tmp_path.rglob("*")) == before  # no runs/, no multirun folder, no TensorBoard file, no lock


def test_hydra_full_error_shows_the_traceback(tmp_path):
    done = run(tmp_path, "train", "algo=dql", "steps=-5", HYDRA_FULL_ERROR="1")
    assert done.returncode == 1 and "Traceback" in done.stderr
    assert done.stderr.rstrip().endswith("ValueError: steps=-5 is out of range; accepted: an integer >= 1")
    assert list(tmp_path.iterdir()) == []
