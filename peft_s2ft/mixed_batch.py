"""Mixed-adapter batches: `peft_model(**batch, adapter_names=[...])`, one adapter (or "__base__") per row.

PEFT routes the argument through the tuner's `_enable_peft_forward_hooks`; the rows of each adapter are grouped
once per forward (`RowGroups`) and set in a context variable for the duration of the call, which every S2FT layer
reads (so calls in other threads, which have their own context, never see them; modules_to_save wrappers get the
names by a pre-hook that reads the same variable). A layer then computes the frozen matmul once for the whole batch
and adds each adapter's contribution on its rows only:

    column delta D on columns S:  y[rows]        += x[rows][..., S] D^T
    row delta D on rows R:        y[rows][..., R] += x[rows] D^T

Inference only: the call is refused while training or merged, where a per-row adapter has no meaning.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator, Sequence

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
            f"`adapter_names` has {self.batch_size} entries (after repeating each name per beam or returned sequence) "
            f"but the batch reaching {where} has {leading} rows: pass one adapter name per input row, and pass "
            "num_beams / num_return_sequences to generate() explicitly, not only through a generation config."
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


_CURRENT: contextvars.ContextVar[RowGroups | None] = contextvars.ContextVar("s2ft_row_groups", default=None)
# Mixed-batch calls running in any thread. While there are none, layers do not look at the context variable at all,
# which torch.compile cannot trace (a compiled model serves one adapter set per call).
_active_calls = 0
_active_lock = threading.Lock()


def current_groups() -> RowGroups | None:
    """The row groups of the mixed-batch call running in this thread, if any."""
    if _active_calls == 0:
        return None
    return _CURRENT.get()


def _count_call(change: int) -> None:
    global _active_calls
    with _active_lock:
        _active_calls += change


def _inject_names(module: nn.Module, args, kwargs):
    groups = _CURRENT.get()
    if groups is not None:
        kwargs["adapter_names"] = groups.adapter_names
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


def _check_model_input(module: nn.Module, args, kwargs) -> None:
    """On the transformers model's own forward (every generation step too): one name per row of its input, checked
    before a layer that sees tokens flattened (OPT, routed experts) could only guess the rows."""
    groups = _CURRENT.get()
    rows = _batch_size(args, kwargs)
    if groups is not None and rows is not None and rows != groups.batch_size:
        raise ValueError(
            f"`adapter_names` has {groups.batch_size} entries (after repeating each name per beam or returned "
            f"sequence) but the model's input has {rows} rows: pass one adapter name per input row, and pass "
            "num_beams / num_return_sequences to generate() explicitly, not only through a generation config."
        )


def _expansion(kwargs: dict) -> int:
    """How many rows `generate` makes of each input row: beams, or returned sequences when sampling."""
    config = kwargs.get("generation_config")
    beams = kwargs.get("num_beams", getattr(config, "num_beams", None)) or 1
    returned = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", None)) or 1
    return max(int(beams), int(returned))


def _batch_size(args, kwargs) -> int | None:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            return value.shape[0]
    return None


@contextlib.contextmanager
def mixed_batch_hooks(tuner: nn.Module, adapter_names, args: tuple = (), kwargs: dict | None = None) -> Iterator[None]:
    """Make the row groups of one call visible to every S2FT layer (and the per-row names to every modules_to_save
    wrapper) in this thread; everything is undone however the call ends."""
    kwargs = kwargs or {}
    names = _checked_names(tuner, adapter_names)
    rows = _batch_size(args, kwargs)
    if rows is not None and rows != len(names):
        raise ValueError(
            f"`adapter_names` has {len(names)} entries but the input has {rows} rows: pass one adapter name per row."
        )
    repeat = _expansion(kwargs)
    groups = RowGroups([n for n in names for _ in range(repeat)])
    token = _CURRENT.set(groups)
    _count_call(+1)
    handles = []
    try:
        handles.append(tuner.model.register_forward_pre_hook(_check_model_input, with_kwargs=True))
        for module in tuner.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                handles.append(module.register_forward_pre_hook(_inject_names, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        _count_call(-1)
        _CURRENT.reset(token)


__all__ = ["BASE", "GROUPS_KWARG", "RowGroups", "add_rows_contribution", "current_groups", "mixed_batch_hooks"]
