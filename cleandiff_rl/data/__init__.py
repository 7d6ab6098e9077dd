"""Data: Minari loading, the D4RL-style dataset builder, normalized scores, torch datasets.

The builder (`cleandiff_rl.data.builder.build_datasets`, SAC in `cleandiff_rl.data.sac`) is
imported on demand, so loading data never pulls in TensorBoard.
"""

from cleandiff_rl.data.loading import DatasetUnavailableError, load_dataset
from cleandiff_rl.data.normalizers import GaussianNormalizer, MinMaxNormalizer, Normalizer, normalizer_from_state
from cleandiff_rl.data.registry import LEVELS, TASKS, build_command, normalized_score, reference_scores
from cleandiff_rl.data.torch_datasets import (
    SequenceDataset,
    TransitionDataset,
    dataset_average,
    discounted_returns,
    read_episodes,
)

__all__ = [
    "LEVELS",
    "TASKS",
    "DatasetUnavailableError",
    "GaussianNormalizer",
    "MinMaxNormalizer",
    "Normalizer",
    "SequenceDataset",
    "TransitionDataset",
    "dataset_average",
    "discounted_returns",
    "build_command",
    "load_dataset",
    "normalized_score",
    "normalizer_from_state",
    "read_episodes",
    "reference_scores",
]
