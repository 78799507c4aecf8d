"""`add_weighted_adapter` for S2FT: fuse adapters column by column on the union of their selections.

Per layer, the fused adapter trains the union U of the adapters' columns (rows). A column that one adapter alone
selects keeps exactly that adapter's weighted delta; where several adapters share columns, "linear" adds their
weighted deltas (so "linear" is the exact weighted sum of the adapters everywhere) and "ties", "dare_linear",
"dare_ties" and "magnitude_prune" run `peft.utils.merge_utils` on those shared columns only, grouped by which
adapters share them, so the zeros an adapter has outside its own selection never dilute a density.

The fused adapter is injected like a loaded file (indices and deltas in original coordinates, every check of
checkpoint.py), so it saves, loads, merges and hot-swaps like any other.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from peft.utils import merge_utils
from peft.utils.other import _freeze_adapter

from .checkpoint import CHECKPOINT_PREFIX, DELTA, INDICES
from .config import S2FTConfig
from .experts import S2FTExpertsLayer
from .layer import S2FTTunerLayer

COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_MERGERS = {
    "ties": merge_utils.ties,
    "dare_linear": merge_utils.dare_linear,
    "dare_ties": merge_utils.dare_ties,
    "magnitude_prune": merge_utils.magnitude_prune,
}
_SIGNED = ("ties", "dare_ties")  # the ones that elect a sign


class _FusedSource:
    """An in-memory adapter file: injection reads and checks it as it reads a folder."""

    def __init__(self, state_dict: dict[str, torch.Tensor], fingerprint: tuple) -> None:
        self._state_dict = state_dict
        self.fingerprint = fingerprint

    def read(self) -> dict[str, torch.Tensor]:
        return self._state_dict


def fuse_selected(
    indices: Sequence[torch.Tensor],
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    dim: int,
    combination_type: str = "linear",
    density: float | None = None,
    majority_sign_method: str = "total",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(union of the indices, fused delta on it in float32); `dim` is the axis of each delta the indices index."""
    union = torch.unique(torch.cat([i.cpu().long() for i in indices]))  # sorted
    positions = [torch.searchsorted(union, i.cpu().long()) for i in indices]
    shape = list(deltas[0].shape)
    shape[dim] = len(union)
    fused = torch.zeros(shape, dtype=torch.float32)
    deltas = [d.detach().cpu().float() for d in deltas]
    if combination_type == "linear":
        for weight, where, delta in zip(weights, positions, deltas, strict=True):
            fused.index_add_(dim, where, weight * delta)
        return union, fused
    owners = torch.zeros(len(union), len(indices), dtype=torch.bool)
    local = torch.full((len(union), len(indices)), -1, dtype=torch.long)
    for a, where in enumerate(positions):
        owners[where, a] = True
        local[where, a] = torch.arange(len(where))
    for signature in torch.unique(owners, dim=0):
        columns = (owners == signature).all(dim=1).nonzero().flatten()
        members = signature.nonzero().flatten().tolist()
        parts = [deltas[a].index_select(dim, local[columns, a]) for a in members]
        if len(members) == 1:
            merged = weights[members[0]] * parts[0]
        else:
            extra = {"majority_sign_method": majority_sign_method} if combination_type in _SIGNED else {}
            merged = _MERGERS[combination_type](
                parts, torch.tensor([weights[a] for a in members], dtype=torch.float32), density, **extra
            )
        fused.index_copy_(dim, columns, merged)
    return union, fused


def _fuse_experts(layer: S2FTExpertsLayer, present: list[str], weights: list[float], **options):
    """Per expert, the fused channels; experts whose unions are smaller get zero-delta channels so that every
    expert has the same count (the layer's [E, k] layout), which changes nothing."""
    per_expert = []
    for e in range(layer.num_experts):
        indices = [layer.selected(a)[e] for a in present]
        deltas = [layer.s2ft_delta[a][e] for a in present]  # [H, k]
        per_expert.append(fuse_selected(indices, deltas, weights, 1, **options))
    width = max(len(union) for union, _ in per_expert)
    all_indices, all_deltas = [], []
    for union, fused in per_expert:
        free = torch.ones(layer.intermediate_size, dtype=torch.bool)
        free[union] = False
        padding = free.nonzero().flatten()[: width - len(union)]
        order = torch.argsort(torch.cat([union, padding]))
        all_indices.append(torch.cat([union, padding])[order])
        padded = torch.cat([fused, fused.new_zeros(fused.shape[0], len(padding))], dim=1)
        all_deltas.append(padded[:, order])
    return torch.stack(all_indices), torch.stack(all_deltas)


def _check_request(tuner, adapters, weights, adapter_name, combination_type, density, majority_sign_method) -> None:
    if isinstance(adapters, str) or not adapters or len(set(adapters)) != len(adapters):
        raise ValueError(f"`adapters` must be a non-empty list of distinct adapter names, got {adapters!r}.")
    missing = [a for a in adapters if a not in tuner.peft_config]
    if missing:
        raise ValueError(f"Adapter(s) {', '.join(missing)} do not exist; the model has {', '.join(tuner.peft_config)}.")
    foreign = [a for a in adapters if not isinstance(tuner.peft_config[a], S2FTConfig)]
    if foreign:
        raise ValueError(f"Adapter(s) {', '.join(foreign)} are not S2FT adapters; S2FT fuses S2FT adapters only.")
    if len(weights) != len(adapters) or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ValueError(f"`weights` must hold one finite number per adapter ({len(adapters)}), got {weights!r}.")
    if adapter_name in tuner.peft_config:
        raise ValueError(
            f"An adapter named '{adapter_name}' already exists; choose another name or delete_adapter it first."
        )
    if combination_type not in COMBINATIONS:
        hint = " ('linear' is already the exact weighted sum for S2FT)" if combination_type == "cat" else ""
        raise ValueError(
            f"combination_type='{combination_type}' is not available for S2FT adapters{hint}; choose one of "
            f"{', '.join(COMBINATIONS)} (the SVD-based types of LoRA have no meaning for column deltas)."
        )
    if combination_type != "linear" and (density is None or not 0 < density <= 1):
        raise ValueError(f"combination_type='{combination_type}' needs a `density` in (0, 1], got {density!r}.")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}.")
    configs = [tuner.peft_config[a] for a in adapters]
    if any(c.permute for c in configs):
        raise ValueError(
            "An adapter made with S2FTConfig.permute=True is the only adapter its model can hold, so it cannot be "
            "fused into a new one. Fuse adapters made in the default mode (permute=False)."
        )
    if any(c.modules_to_save for c in configs):
        raise ValueError(
            "S2FT fuses its column deltas, not whole modules: adapters with modules_to_save (e.g. a classifier) "
            "cannot be fused. Fuse adapters without modules_to_save."
        )


# Budget fields that must agree with the union's targets when the saved config is read by a path that re-checks
# it (transformers' load_adapter); where the sources differ they fall back to their defaults.
_BUDGET_FIELDS = (
    "trainable_ratio",
    "attention_share",
    "heads_per_layer",
    "head_ratio",
    "channels_per_layer",
    "channel_ratio",
)


def _fused_config(configs: list[S2FTConfig], state_dict: dict[str, torch.Tensor]) -> S2FTConfig:
    config = copy.deepcopy(configs[0])
    config.init_weights = True
    config.disjoint_from = None
    vars(config).pop("_calibration", None)  # the fused file holds the selection
    config.train_v = any(c.train_v for c in configs)
    config.train_up = any(c.train_up for c in configs)
    defaults = S2FTConfig()
    for name in _BUDGET_FIELDS:
        if any(getattr(c, name) != getattr(config, name) for c in configs):
            setattr(config, name, getattr(defaults, name))
    if all(isinstance(c.target_modules, set) for c in configs):
        config.target_modules = set().union(*(c.target_modules for c in configs))
    if any(c.layers_to_transform != config.layers_to_transform for c in configs):
        config.layers_to_transform, config.layers_pattern = None, None  # the fused file says which layers
    config._adapter_source = _FusedSource(state_dict, config.selection_fingerprint())
    return config


def add_weighted_adapter(
    tuner,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "linear",
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Create adapter `adapter_name` from the weighted combination of `adapters` (see the module docstring)."""
    weights = list(weights)
    _check_request(tuner, adapters, weights, adapter_name, combination_type, density, majority_sign_method)
    options = dict(combination_type=combination_type, density=density, majority_sign_method=majority_sign_method)
    state_dict, values = {}, {}
    for path, layer in tuner.model.named_modules():
        if not isinstance(layer, S2FTTunerLayer):
            continue
        present = [a for a in adapters if a in layer.s2ft_delta]
        if not present:
            continue
        layer_weights = [weights[adapters.index(a)] for a in present]
        if isinstance(layer, S2FTExpertsLayer):
            union, fused = _fuse_experts(layer, present, layer_weights, **options)
        else:
            indices = [layer.selected(a) for a in present]
            deltas = [layer.s2ft_delta[a] for a in present]
            union, fused = fuse_selected(indices, deltas, layer_weights, layer.dim, **options)
        state_dict[f"{CHECKPOINT_PREFIX}{path}.{INDICES}"] = union
        state_dict[f"{CHECKPOINT_PREFIX}{path}.{DELTA}"] = fused
        dtype = layer.s2ft_delta[present[0]].dtype
        for name in present[1:]:  # the widest of the sources' dtypes: no source is rounded to a narrower one
            dtype = torch.promote_types(dtype, layer.s2ft_delta[name].dtype)
        values[path] = (fused, dtype)
    tuner.peft_config[adapter_name] = _fused_config([tuner.peft_config[a] for a in adapters], state_dict)
    try:
        tuner.inject_adapter(tuner.model, adapter_name)
    except BaseException:
        tuner.peft_config.pop(adapter_name, None)
        raise
    with torch.no_grad():
        for path, (fused, dtype) in values.items():
            param = tuner.model.get_submodule(path).s2ft_delta[adapter_name]
            param.data = fused.to(device=param.device, dtype=dtype)
    _freeze_adapter(tuner.model, adapter_name)


__all__ = ["COMBINATIONS", "add_weighted_adapter", "fuse_selected"]
