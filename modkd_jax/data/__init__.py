"""Data layer: datasets in memory (sources), task sequences (scenarios), device batches (batching)."""

from modkd_jax.data.batching import (
    augment,
    epoch_batches,
    eval_batches,
    num_batches,
    random_crop_flip,
    to_float,
)
from modkd_jax.data.scenarios import (
    SCENARIOS,
    Scenario,
    Split,
    Task,
    build,
    class_split,
    dataset_sequence,
    merged_stream,
    permuted,
    rotated,
)
from modkd_jax.data.sources import (
    DATASETS,
    Dataset,
    DataUnavailableError,
    load,
    normalization,
)

__all__ = [
    "DATASETS",
    "SCENARIOS",
    "Dataset",
    "DataUnavailableError",
    "Scenario",
    "Split",
    "Task",
    "augment",
    "build",
    "class_split",
    "dataset_sequence",
    "epoch_batches",
    "eval_batches",
    "load",
    "merged_stream",
    "normalization",
    "num_batches",
    "permuted",
    "random_crop_flip",
    "rotated",
    "to_float",
]
