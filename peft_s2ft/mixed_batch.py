"""Mixed-adapter batches: `peft_model(**batch, adapter_names=[...])`, one adapter (or "__base__") per row.

PEFT routes the argument through the tuner's `_enable_peft_forward_hooks`; the rows of each adapter are grouped
once per forward (`RowGroups`) and handed to every S2FT layer by a forward pre-hook. A layer then computes the
frozen matmul once for the whole batch and adds each adapter's contribution on its rows only:

    column delta D on columns S:  y[rows]        += x[rows][..., S] D^T
    row delta D on rows R:        y[rows][..., R] += x[rows] D^T

Inference only: the call is refused while training or merged, where a per-row adapter has no meaning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .partial_backprop import COLUMNS

BASE = "__base__"
GROUPS_KWARG = "s2ft_row_groups"


class RowGroups:
    """Which batch rows use which adapter, computed once per forward; index tensors are cached per device."""

    def __init__(self, adapter_names: Sequence[str]) -> None:
        self.adapter_names = list(adapter_names)
        self.batch_size = len(self.adapter_names)
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(self.adapter_names):
            rows.setdefault(name, []).append(row)
        self._rows = {name: torch.tensor(r, dtype=torch.long) for name, r in rows.items() if name != BASE}
        self._cache: dict[tuple, list[tuple[str, torch.Tensor]]] = {}

    @property
    def names(self) -> set[str]:
        return set(self._rows)

    def rows(self, device: torch.device, per_row: int = 1) -> list[tuple[str, torch.Tensor]]:
        """(adapter, indices) per adapter; with `per_row` > 1 the indices address the flattened (row, position)
        items of a (batch * per_row, ...) tensor, as fused experts see the tokens."""
        key = (device, per_row)
        if key not in self._cache:
            groups = []
            for name, rows in self._rows.items():
                if per_row > 1:
                    rows = (rows[:, None] * per_row + torch.arange(per_row)).flatten()
                groups.append((name, rows.to(device)))
            self._cache[key] = groups
        return self._cache[key]

    def rows_of(self, x: torch.Tensor, where: str) -> list[tuple[str, torch.Tensor]]:
        """The groups as indices into x's first axis: batch rows, or the tokens of a (batch * positions, features)
        input, which some models (OPT, every routed MoE) flatten row by row before their projections."""
        leading = x.shape[0]
        if leading == self.batch_size:
            return self.rows(x.device)
        if x.ndim == 2 and leading % self.batch_size == 0:
            return self.rows(x.device, leading // self.batch_size)
        raise ValueError(
            f"`adapter_names` has {self.batch_size} entries but the batch reaching {where} has {leading} rows: pass "
            "one adapter name per input row (beam search repeats each name per beam by itself)."
        )


def add_rows_contribution(
    out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, axis: str, where, index, delta: torch.Tensor
) -> None:
    """out[rows] += the delta's contribution for x[rows], in place; `where` is a contiguous range (permute mode)
    or None, with `index` the delta's columns (rows) of the weight."""
    sub = x.index_select(0, rows)
    dtype = out.dtype  # what the frozen matmul computed in: x's dtype, or autocast's
    weight = delta.to(dtype)
    if axis == COLUMNS:
        selected = sub[..., where[0] : where[1]] if where is not None else sub.index_select(-1, index)
        out.index_add_(0, rows, F.linear(selected.to(dtype), weight).to(out.dtype))
        return
    product = F.linear(sub.to(dtype), weight).to(out.dtype)
    if where is not None:
        out[..., where[0] : where[1]].index_add_(0, rows, product)
        return
    flat = out.view(out.shape[0], -1, out.shape[-1])
    positions = torch.arange(flat.shape[1], device=out.device)
    flat.index_put_(
        (rows[:, None, None], positions[None, :, None], index[None, None, :]),
        product.reshape(len(rows), -1, product.shape[-1]),
        accumulate=True,
    )


def _inject(module: nn.Module, args, kwargs, name: str, value):
    kwargs[name] = value
    return args, kwargs


def _known_adapters(tuner: nn.Module) -> set[str]:
    from .layer import S2FTTunerLayer

    return {name for m in tuner.modules() if isinstance(m, S2FTTunerLayer) for name in m.s2ft_delta}


def _checked_names(tuner: nn.Module, adapter_names) -> list[str]:
    from .layer import S2FTTunerLayer

    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(
            f"`adapter_names` must be a list with one adapter name (or '{BASE}') per input row, got {adapter_names!r}."
        )
    if tuner.training:
        raise ValueError(
            "Cannot pass `adapter_names` when the model is in training mode: mixed-adapter batches are for "
            "inference. Call model.eval() first."
        )
    unknown = {n for n in adapter_names if n != BASE} - _known_adapters(tuner)
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
    merged = sorted({n for m in tuner.modules() if isinstance(m, S2FTTunerLayer) for n in m.merged_adapters})
    if merged:
        raise ValueError(
            f"Cannot pass `adapter_names` while adapter(s) {', '.join(merged)} are merged into the base weights: every "
            "row would see them. Call unmerge_adapter() first."
        )
    return list(adapter_names)


@contextlib.contextmanager
def mixed_batch_hooks(tuner: nn.Module, adapter_names, num_beams=None) -> Iterator[None]:
    """Give every S2FT layer the row groups (and every modules_to_save wrapper the per-row names) for one call;
    the hooks are removed however the call ends."""
    from .layer import S2FTTunerLayer

    names = _checked_names(tuner, adapter_names)
    if isinstance(num_beams, int) and num_beams > 1:
        names = [n for n in names for _ in range(num_beams)]
    groups = RowGroups(names)
    handles = []
    try:
        for module in tuner.modules():
            if isinstance(module, S2FTTunerLayer):
                hook = partial(_inject, name=GROUPS_KWARG, value=groups)
            elif isinstance(module, AuxiliaryTrainingWrapper):
                hook = partial(_inject, name="adapter_names", value=names)
            else:
                continue
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["BASE", "GROUPS_KWARG", "RowGroups", "add_rows_contribution", "mixed_batch_hooks"]
