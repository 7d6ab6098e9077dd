"""A Minari dataset with broken data is one clear error naming the dataset, the field, where and how much;
a pipeline given one says so in one `error:` line, exits 2 and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import minari
import numpy as np
import pytest
from offline_data import broken_dataset, pendulum_dataset, random_dataset

from cleandiff_rl.data import SequenceDataset, TransitionDataset, read_episodes

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
DATASET = "test/hopper/broken-v0"
EXPECTED = {  # broken_dataset breaks episode 1 at step 2
    "nan_observations": "1 step with non-finite (NaN/inf) observations, the first at episode 1, step 2",
    "inf_rewards": "2 steps with non-finite (NaN/inf) rewards, the first at episode 1, step 2",
    "actions_outside": "1 step with actions outside the action space, the first at episode 1, step 2: action[1] = 1.5 "
                       "not in [-1, 1]",
    "observation_size": "episode 1 has observations of size 10; its observation space has 11",
    "mismatched_lengths": "episode 1 has fields of mismatched lengths {'observations': ",
    "missing_rewards": "episode 1 has no 'rewards' field",
}


@pytest.mark.parametrize("defect", list(EXPECTED))
def test_broken_data_is_one_error_naming_dataset_field_and_place(minari_root, defect):
    broken_dataset(DATASET, defect)
    with pytest.raises(ValueError) as error:
        read_episodes(DATASET)
    message = str(error.value)
    assert message.startswith(f"dataset {DATASET}: {EXPECTED[defect]}"), message
    assert "\n" not in message and len(message) < 300
    with pytest.raises(ValueError, match=f"^dataset {DATASET}: "):  # what every training reads through
        TransitionDataset(DATASET, device="cpu")
    with pytest.raises(ValueError, match=f"^dataset {DATASET}: "):
        SequenceDataset(DATASET, horizon=4, device="cpu")


def test_mismatched_lengths_name_every_field(minari_root):
    broken_dataset(DATASET, "mismatched_lengths")
    steps = len(next(ep for ep in minari.load_dataset(DATASET).iterate_episodes() if ep.id == 1).actions)
    with pytest.raises(ValueError) as error:
        read_episodes(DATASET)
    assert f"{{'observations': {steps + 1}, 'actions': {steps}, 'rewards': {steps - 1}, 'terminations': {steps}, " \
           f"'truncations': {steps}}}" in str(error.value)


def test_sound_data_passes_actions_on_the_bounds_included(minari_root):
    """The pendulum controller clips its actions to the box [-3, 3] (often, at this noise): steps on the
    bounds are valid."""
    episodes = read_episodes(pendulum_dataset(n_steps=300, noise=3.0))
    assert (np.abs(episodes.act) == 3.0).sum() > 10 and len(episodes.rew) == 300
    hopper = read_episodes(random_dataset("test/hopper/random-v0", n_steps=200))
    assert hopper.obs.shape == (200, 11) and np.isfinite(hopper.rew).all()


def test_train_on_a_nan_dataset_is_one_error_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    broken_dataset(DATASET, "nan_observations")
    before = sorted(tmp_path.rglob("*"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run([sys.executable, str(PIPELINES / "train.py"), "algo=bc", f"dataset={DATASET}", "steps=2",
                           "eval_every=0", "device=cpu"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"error: dataset {DATASET}: {EXPECTED['nan_observations']}; fix or rebuild the data\n"
    assert sorted(tmp_path.rglob("*")) == before  # no runs/ folder, no TensorBoard file, no lock
