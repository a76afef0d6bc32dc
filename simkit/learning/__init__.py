"""The learning layer: datasets, partitions, split models, FLOP counts and losses.

Pure PyTorch/numpy; it knows nothing of SimPy, devices or networks (DESIGN.md §7: ``world``
and ``learning`` never import each other, ``algorithms`` joins them).
"""

from __future__ import annotations

from simkit.learning.data import KNOWN_DATASETS, ArrayData, clear_dataset_cache, load_dataset
from simkit.learning.flops import FlopCount, clear_flop_cache, count_flops
from simkit.learning.losses import proximal_term, supcon_loss
from simkit.learning.models import (
    FAMILIES,
    MixedModels,
    SplitModel,
    build_client_backbone,
    build_mixed_models,
    build_split_model,
    init_parameters,
    layer_count,
    model_bytes,
    resolve_family,
)
from simkit.learning.partition import ClientData, class_histogram, format_histogram, partition

__all__ = [
    "ArrayData", "KNOWN_DATASETS", "load_dataset", "clear_dataset_cache",
    "ClientData", "partition", "class_histogram", "format_histogram",
    "FAMILIES", "SplitModel", "MixedModels", "resolve_family", "layer_count", "build_split_model",
    "build_client_backbone", "build_mixed_models", "init_parameters", "model_bytes",
    "FlopCount", "count_flops", "clear_flop_cache",
    "supcon_loss", "proximal_term",
]
