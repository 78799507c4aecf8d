"""Parameters that DeepSpeed ZeRO-3 has partitioned (`deepspeed.zero.Init`, which transformers' `from_pretrained`
uses once `TrainingArguments(deepspeed=<stage-3 config>)` exists).

Each rank then keeps a flat slice elsewhere and the parameter itself is an empty tensor; its real shape and size
are in `ds_shape` and `ds_numel`. S2FT sizes its budget and its blocks from shapes, so it reads them from there;
what needs the values (weight-based selection, permute mode) is refused with a clear error, since they are not on
this rank at all.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The tensor's shape, also for a ZeRO-3 partitioned parameter (whose own shape is (0,))."""
    return torch.Size(getattr(tensor, "ds_shape", tensor.shape))


def full_numel(tensor: torch.Tensor) -> int:
    return int(getattr(tensor, "ds_numel", tensor.numel()))


def is_partitioned(tensor: torch.Tensor) -> bool:
    """True while the parameter's values are spread over the ranks (not gathered, e.g. by `GatheredParameters`)."""
    return hasattr(tensor, "ds_numel") and tensor.numel() != full_numel(tensor)


def refuse_partitioned(weights: Iterable[torch.Tensor], feature: str, alternative: str = "") -> None:
    """Raise when `feature` would read the values of ZeRO-3 partitioned weights."""
    if any(is_partitioned(w) for w in weights):
        raise ValueError(
            f"{feature} reads the model's weights, but DeepSpeed ZeRO-3 has partitioned them over the ranks (the "
            "model was loaded under deepspeed.zero.Init, as from_pretrained does once TrainingArguments with a "
            "stage-3 config exist). Load the model and call get_peft_model before creating the TrainingArguments "
            f"(DeepSpeed partitions it when training starts){alternative}."
        )
