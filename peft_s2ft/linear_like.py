"""The layers S2FT trains: `nn.Linear` (and subclasses such as Falcon's) and transformers' `Conv1D` (GPT-2),
which stores its weight transposed, (in, out). Everything else in the package sees both as (out, in). A linear
layer with a quantized weight (quantized.py) is read through `readable_weight`."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .partitioned import full_shape
from .quantized import QuantizedWeight, format_of

LinearLike = nn.Linear | Conv1D


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def features(module: LinearLike) -> tuple[int, int]:
    """(out_features, in_features)."""
    if isinstance(module, Conv1D):
        shape = full_shape(module.weight)
        return shape[1], shape[0]
    return module.out_features, module.in_features


def logical_weight(module: LinearLike, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The weight as (out, in): the parameter itself for nn.Linear, a transposed view (no copy) for Conv1D."""
    weight = module.weight if weight is None else weight
    return weight.t() if isinstance(module, Conv1D) else weight


def weight_dim(module: LinearLike, side: str) -> int:
    """The stored weight's dimension holding output rows ("out") or input columns ("in")."""
    transposed = isinstance(module, Conv1D)
    return (1 if transposed else 0) if side == "out" else (0 if transposed else 1)


def readable_weight(module: LinearLike) -> torch.Tensor | QuantizedWeight:
    """The weight as (out, in) for reading: `logical_weight` for a float weight, a `QuantizedWeight` (shape now,
    values dequantized on demand) for a quantized one."""
    fmt = format_of(module)
    return logical_weight(module) if fmt is None else QuantizedWeight(module, fmt)


def weight_values(weight: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """The values of a `readable_weight`: the tensor itself, or the quantized weight dequantized."""
    return weight.values() if isinstance(weight, QuantizedWeight) else weight
