"""Hot-swapping S2FT adapters: another adapter's weights into an existing adapter, in place.

A served model, compiled or not, switches adapters fastest when nothing but tensor values change: the delta
Parameters and index buffers of the existing adapter keep their identity, shape, dtype and device and only receive
new values with `copy_`, so a `torch.compile`d graph stays valid (no recompilation) and references held elsewhere
(an optimizer, a CUDA graph) stay good. A layer whose new selection is smaller than the one it holds is padded with
zero-delta entries; a larger selection, or a layer the adapter does not train yet, would change a shape:
`prepare_model_for_compiled_hotswap` makes room for every adapter to come before the model is compiled.

The new adapter's file gets every check the normal load paths run (checkpoint.py): a non-S2FT file, a file for
another base geometry, or one that does not fit this model is refused before the first value is copied, so a
refused swap leaves the model exactly as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from dataclasses import dataclass

import torch
from huggingface_hub import hf_hub_download
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

from .architectures import EXPERTS, ModelStructure, describe
from .architectures.description import KV_GROUP
from .architectures.discovery import base_layer_of
from .checkpoint import (
    CHECKPOINT_PREFIX,
    DELTA,
    INDICES,
    AdapterMismatchError,
    _entries,
    attach_planned,
    check_checkpoint,
    check_geometry,
)
from .config import S2FTConfig
from .experts import S2FTExpertsLayer
from .layer import S2FTTunerLayer
from .linear_like import features
from .partial_backprop import COLUMNS

# Config fields that describe how this model holds the adapter rather than what the adapter is; a swap keeps them.
KEPT_CONFIG_FIELDS = ("peft_type", "task_type", "inference_mode", "permute", "modules_to_save", "init_weights")
PREPARE_HINT = (
    "Call prepare_model_for_compiled_hotswap(model, adapters=[...every adapter you will swap in...], "
    "adapter_name=...) after loading the first adapter and before torch.compile, so every layer has room for all "
    "of them."
)


# --------------------------------------------------------------------------------------------------
# what the model holds
def _unwrapped(model: nn.Module) -> nn.Module:
    """The module a `torch.compile` wrapper (OptimizedModule) compiles; its tensors are the model's own."""
    while hasattr(model, "_orig_mod"):
        model = model._orig_mod
    return model


def _root_and_configs(model: nn.Module) -> tuple[nn.Module, dict]:
    """(the transformers model the adapter layers live in, the adapter configs) of a PeftModel, a tuner, or a
    transformers model with an injected adapter."""
    model = _unwrapped(model)
    if isinstance(model, BaseTuner):
        return model.model, model.peft_config
    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, BaseTuner):
        return tuner.model, tuner.peft_config
    configs = getattr(model, "peft_config", None)
    return model, configs if isinstance(configs, dict) else {}


def _adapter_config(configs: dict, adapter_name: str) -> S2FTConfig:
    if adapter_name not in configs:
        known = ", ".join(f"'{name}'" for name in configs) or "none"
        raise ValueError(
            f"The model has no adapter named '{adapter_name}' (its adapters: {known}). Hot-swapping replaces the "
            "weights of an adapter that is already loaded: load the first adapter under that name."
        )
    config = configs[adapter_name]
    if not isinstance(config, S2FTConfig):
        raise ValueError(
            f"Adapter '{adapter_name}' is a {type(config).__name__} adapter, not S2FT; peft_s2ft's hot-swap handles "
            "S2FT adapters only (peft.utils.hotswap handles LoRA)."
        )
    return config


def _adapter_layers(root: nn.Module, adapter_name: str) -> dict[str, S2FTTunerLayer]:
    layers = {
        path: module
        for path, module in root.named_modules()
        if isinstance(module, S2FTTunerLayer) and adapter_name in module.s2ft_delta
    }
    if not layers:
        raise ValueError(f"Adapter '{adapter_name}' has no S2FT layer in this model; there is nothing to swap into.")
    for path, layer in layers.items():
        if layer.s2ft_delta[adapter_name].is_meta:
            raise ValueError(
                f"Adapter '{adapter_name}' lives on the meta device (layer '{path}'); values copied there would be "
                "lost. Materialize the model (to_empty, then load its weights) before hot-swapping."
            )
    return layers


def _refuse_permute_mode(config: S2FTConfig, layers: dict[str, S2FTTunerLayer], adapter_name: str) -> None:
    permuted = config.permute or any(getattr(layer, "block_range", None) is not None for layer in layers.values())
    if permuted:
        raise ValueError(
            f"Adapter '{adapter_name}' is in permute mode (S2FTConfig.permute=True): the base weights are physically "
            "co-permuted for its one selection, so another selection cannot be swapped in by copying values. Load the "
            "adapters with permute=False (the default; any S2FT file, permute-trained ones included, loads that way) "
            "to hot-swap them."
        )


def _refuse_merged(layers: dict[str, S2FTTunerLayer], adapter_name: str) -> None:
    merged = sorted(path for path, layer in layers.items() if adapter_name in layer.merged_adapters)
    if merged:
        raise ValueError(
            f"Adapter '{adapter_name}' is merged into the base weights (layer '{merged[0]}' and {len(merged) - 1} "
            "more); preparing would resize its blocks under the merged columns. Call unmerge_adapter() first (and "
            "merge again afterwards if you want)."
        )


def _is_compiled(model: nn.Module) -> bool:
    """A compile wrapper (OptimizedModule, `_orig_mod`), `module.compile()`, or a module a wrapper was made for
    (torch.compile marks the original `_is_torch_compile`), anywhere in the model."""
    from torch._dynamo.eval_frame import OptimizedModule

    return any(
        isinstance(module, OptimizedModule)
        or hasattr(module, "_orig_mod")
        or getattr(module, "_compiled_call_impl", None) is not None
        or getattr(module, "_is_torch_compile", False)
        for module in model.modules()
    )


def _delta_dim(layer: S2FTTunerLayer) -> int:
    """The delta's dimension that runs over the selection: columns (out, k), rows (k, in), experts [E, H, k]."""
    return 2 if isinstance(layer, S2FTExpertsLayer) else layer.dim


def _width(indices: torch.Tensor) -> int:
    """Positions per layer (per expert for an experts layer's [E, k] indices)."""
    return int(indices.shape[-1])


# --------------------------------------------------------------------------------------------------
# reading another adapter, with every check of the load paths
_DOWNLOAD_KWARGS = frozenset(inspect.signature(hf_hub_download).parameters) - {
    "repo_id",
    "filename",
}


def _refuse_unknown_kwargs(kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - _DOWNLOAD_KWARGS)
    if unknown:
        raise TypeError(
            f"Unexpected keyword argument(s) {', '.join(unknown)}: the adapter's file decides its config, so only "
            f"download arguments are accepted ({', '.join(sorted(_DOWNLOAD_KWARGS))})."
        )


def _read_adapter(model_name_or_path: str, kwargs: dict) -> tuple[S2FTConfig, dict[str, torch.Tensor]]:
    """The adapter's config and tensors from a local folder or a hub id (through checkpoint.AdapterSource)."""
    config = S2FTConfig.from_pretrained(str(model_name_or_path), **kwargs)
    if not isinstance(config, S2FTConfig):
        raise AdapterMismatchError(
            f"'{model_name_or_path}' holds a {type(config).__name__} adapter, not an S2FT adapter; only S2FT adapters "
            "can be swapped into an S2FT adapter."
        )
    state_dict = config._adapter_source.read()
    if state_dict is None:
        raise AdapterMismatchError(
            f"'{model_name_or_path}' has an S2FT adapter config but no weights file (adapter_model.safetensors or "
            "adapter_model.bin); save the adapter with its weights."
        )
    return config, state_dict


def _checked_adapter(
    root: nn.Module, structure: ModelStructure, current: S2FTConfig, model_name_or_path: str, kwargs: dict
) -> tuple[S2FTConfig, dict[str, torch.Tensor], dict[str, tuple[str, torch.Tensor]]]:
    """(config, tensors, path -> (axis, indices)) of an adapter that fits this base model; raises otherwise."""
    config, state_dict = _read_adapter(model_name_or_path, kwargs)
    if current.task_type and config.task_type and current.task_type != config.task_type:
        raise AdapterMismatchError(
            f"'{model_name_or_path}' is a {config.task_type} adapter, but the model's adapter is {current.task_type}; "
            "an adapter only fits the model class it was made for."
        )
    check_geometry(config, structure)
    return config, state_dict, check_checkpoint(root, state_dict)


# --------------------------------------------------------------------------------------------------
# padding: zero-delta entries at positions the selection does not use
def _unit_positions(structure: ModelStructure, path: str) -> torch.Tensor | None:
    """[units, width] positions of the units a linear layer's span trains (None for an experts layer, whose unit is
    one channel per expert)."""
    block, role = structure.trainable_paths()[path]
    if role == EXPERTS:
        return None
    span = block.trained[role]
    count = block.num_groups if span.unit == KV_GROUP else block.num_units
    return span.positions(torch.arange(count)).reshape(count, span.width)


def _free_positions(taken: torch.Tensor, count: int, units: torch.Tensor | None, limit: int) -> torch.Tensor:
    """`count` positions in [0, limit) outside `taken`: first whole units `taken` does not touch (so a padded
    adapter still saves as whole units and reloads), then the rest of the span, then anything else."""
    everything = torch.arange(limit)
    if units is None:
        order = everything
    else:
        touched = torch.isin(units, taken).any(dim=1)
        outside = everything[~torch.isin(everything, units)]
        order = torch.cat((units[~touched].reshape(-1), units[touched].reshape(-1), outside))
    free = order[~torch.isin(order, taken)]
    if len(free) < count:  # callers never ask for more than the layer has
        raise RuntimeError(f"Cannot pad to {count} more positions: only {len(free)} are free.")
    return free[:count]


def _padded_indices(layer: S2FTTunerLayer, units: torch.Tensor | None, indices: torch.Tensor, width: int):
    """`indices` ([k] or [E, k]) extended to `width` positions per layer (per expert) with unused positions."""
    if isinstance(layer, S2FTExpertsLayer):
        rows = [
            torch.cat((row, _free_positions(row, width - len(row), None, layer.intermediate_size))) for row in indices
        ]
        padded = torch.stack(rows) if rows else indices
    else:
        padded = torch.cat((indices, _free_positions(indices, width - len(indices), units, layer.index_limit)))
    return layer._checked_indices("padding", padded)  # the layer's own validation: in range, unique, integer


def _padded_delta(param: torch.Tensor, values: torch.Tensor | None, dim: int) -> torch.Tensor:
    """A zero tensor like `param` (shape, dtype, device) holding `values` in its first positions along `dim`."""
    padded = torch.zeros(param.shape, dtype=param.dtype, device=param.device)
    if values is not None:
        padded.narrow(dim, 0, values.shape[dim]).copy_(values)
    return padded


def _check_same_kind(path: str, layer: S2FTTunerLayer, axis: str) -> None:
    held = EXPERTS if isinstance(layer, S2FTExpertsLayer) else layer.axis
    if held != axis:
        names = {EXPERTS: "experts channels", "in": "input columns", "out": "output rows"}
        raise AdapterMismatchError(
            f"Layer '{path}': the new adapter trains its {names.get(axis, axis)}, the adapter in the model its "
            f"{names.get(held, held)}; a swap can only replace values of the same kind."
        )


# --------------------------------------------------------------------------------------------------
# hotswap_adapter
@dataclass
class _LayerSwap:
    """One layer's new values, already in the shapes, dtypes and devices of the adapter's tensors."""

    layer: S2FTTunerLayer
    indices: torch.Tensor
    delta: torch.Tensor


def _plan_layer_swaps(
    structure: ModelStructure,
    layers: dict[str, S2FTTunerLayer],
    checked: dict[str, tuple[str, torch.Tensor]],
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
) -> list[_LayerSwap]:
    """Every layer's new values; refuses (changing nothing) what would need another shape."""
    new_layers = sorted(set(checked) - set(layers))
    if new_layers:
        raise ValueError(
            f"The new adapter trains {len(new_layers)} layer(s) that adapter '{adapter_name}' does not "
            f"('{new_layers[0]}'...); a swap cannot add layers (a compiled model would recompile). {PREPARE_HINT}"
        )
    entries = _entries(state_dict)
    swaps = []
    for path, layer in layers.items():
        param = layer.s2ft_delta[adapter_name]
        current = layer.selected(adapter_name)
        if path not in checked:  # the new adapter leaves this layer as the base model has it
            swaps.append(_LayerSwap(layer, current.clone(), _padded_delta(param, None, 0)))
            continue
        axis, incoming = checked[path]
        _check_same_kind(path, layer, axis)
        if _width(incoming) > _width(current):
            per = " per expert" if axis == EXPERTS else ""
            raise ValueError(
                f"Layer '{path}': the new adapter trains {_width(incoming)} positions{per}, adapter '{adapter_name}' "
                f"holds {_width(current)}; a swap cannot grow a tensor (a compiled model would recompile). "
                f"{PREPARE_HINT}"
            )
        indices = _padded_indices(layer, _unit_positions(structure, path), incoming, _width(current))
        delta = _padded_delta(param, entries[path][DELTA], _delta_dim(layer))
        swaps.append(_LayerSwap(layer, indices, delta))
    return swaps


def _plan_saved_modules(
    root: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(target, value) pairs for the adapter's fully trained modules (`modules_to_save`, e.g. a classifier)."""
    wrappers = {
        path: module
        for path, module in root.named_modules()
        if isinstance(module, AuxiliaryTrainingWrapper) and adapter_name in getattr(module, "_adapters", ())
    }
    for path, wrapper in wrappers.items():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            raise ValueError(
                f"Adapter '{adapter_name}' holds a {type(wrapper).__name__} at '{path}'; hot-swap supports S2FT layers "
                "and modules_to_save only."
            )
    held = {
        f"{path}.{name}": tensor
        for path, wrapper in wrappers.items()
        for name, tensor in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items()
    }
    extra = {
        key.removeprefix(CHECKPOINT_PREFIX): value
        for key, value in state_dict.items()
        if not key.endswith((f".{DELTA}", f".{INDICES}"))
    }
    unknown, missing = sorted(set(extra) - set(held)), sorted(set(held) - set(extra))
    if unknown:
        raise AdapterMismatchError(
            f"The new adapter's file holds {len(unknown)} tensor(s) that are neither S2FT layers nor modules_to_save "
            f"of adapter '{adapter_name}' ('{unknown[0]}'...): it trains other modules fully than this adapter does."
        )
    if missing:
        raise AdapterMismatchError(
            f"Adapter '{adapter_name}' fully trains modules (modules_to_save) the new adapter's file has no values for "
            f"('{missing[0]}'...); swapping would keep the old adapter's values there."
        )
    for key, value in extra.items():
        if tuple(value.shape) != tuple(held[key].shape):
            raise AdapterMismatchError(
                f"The new adapter's '{key}' has shape {tuple(value.shape)}, the model's {tuple(held[key].shape)}."
            )
    return [(held[key], value) for key, value in extra.items()]


def _apply_layer_swap(swap: _LayerSwap, adapter_name: str) -> None:
    """Copy the new values in; a merged adapter is unmerged first (restoring the columns by copy) and merged again,
    with every adapter merged in that layer, in the same order."""
    layer = swap.layer
    merged = list(layer.merged_adapters)
    if adapter_name in merged:
        layer.unmerge()
    with torch.no_grad():
        layer.s2ft_delta[adapter_name].copy_(swap.delta)
        layer.s2ft_indices[adapter_name].copy_(swap.indices)
        layer._index_master[adapter_name].copy_(swap.indices)
    if adapter_name in merged:
        layer.merge(adapter_names=merged)


def _adopt_config(current: S2FTConfig, incoming: S2FTConfig, structure: ModelStructure) -> None:
    """The adapter's config now describes the new file (selection fields, targets, base model), in place; the fields
    about how the model holds it (KEPT_CONFIG_FIELDS) stay."""
    for config_field in dataclasses.fields(incoming):
        if config_field.name not in KEPT_CONFIG_FIELDS:
            setattr(current, config_field.name, copy.deepcopy(getattr(incoming, config_field.name)))
    current._adapter_source = incoming._adapter_source
    current._loaded_geometry = incoming.base_geometry
    current.base_geometry = structure.geometry()


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str,
    adapter_name: str = "default",
    torch_device: str | torch.device | None = None,
    **kwargs,
) -> None:
    """Load the S2FT adapter at `model_name_or_path` (a folder or a hub id) into the loaded adapter `adapter_name`,
    in place, like `peft.utils.hotswap.hotswap_adapter` does for LoRA.

    The adapter's delta Parameters and index buffers keep their identity, shape, dtype and device; only values are
    copied, so a `torch.compile`d model (pass it or its original) runs the new adapter without recompiling. Merged
    adapters are swapped merged: the overwritten columns are restored by copy and the new values merged, bit-exact.
    A layer whose new selection is smaller is padded with zero-delta entries at positions outside it (whole unused
    units first, so a saved swap reloads); a layer the new adapter does not train gets an all-zero delta. Fused
    experts layers are supported the same way, padded expert by expert.

    Refused before anything changes (ValueError, or AdapterMismatchError for the file): an unknown or non-S2FT
    adapter, permute mode, a file that is not an S2FT adapter or was made for another base geometry or task, a layer
    the adapter does not train or a selection larger than it holds (call `prepare_model_for_compiled_hotswap` with
    the adapters first), other fully trained modules (modules_to_save) than the adapter's.

    `torch_device` is where the file's tensors are staged before the copy (PEFT's argument); `kwargs` are hub
    download arguments (revision, cache_dir, token, subfolder, ...). The adapter's config is updated to the file's,
    except for the fields in KEPT_CONFIG_FIELDS. An optimizer's state for the old adapter is not touched.
    """
    _refuse_unknown_kwargs(kwargs)
    root, configs = _root_and_configs(model)
    config = _adapter_config(configs, adapter_name)
    layers = _adapter_layers(root, adapter_name)
    _refuse_permute_mode(config, layers, adapter_name)
    structure = describe(root)
    incoming, state_dict, checked = _checked_adapter(root, structure, config, model_name_or_path, kwargs)
    if torch_device is not None:
        state_dict = {key: value.to(torch.device(torch_device)) for key, value in state_dict.items()}
    swaps = _plan_layer_swaps(structure, layers, checked, state_dict, adapter_name)
    saved_modules = _plan_saved_modules(root, state_dict, adapter_name)
    # Everything is checked: from here on only values are copied.
    for swap in swaps:
        _apply_layer_swap(swap, adapter_name)
    with torch.no_grad():
        for target, value in saved_modules:
            target.copy_(value)
    _adopt_config(config, incoming, structure)


# --------------------------------------------------------------------------------------------------
# prepare_model_for_compiled_hotswap
def _target_width(
    layer_limit: int, units: torch.Tensor | None, target_size: int | None, wanted: int, current: int
) -> int:
    """The width a layer gets: the largest of what it holds, what an adapter needs, and `target_size` rounded up
    to whole units (so a padded adapter saves as whole units) and capped at what the layer can train."""
    width = max(current, wanted)
    if target_size is not None:
        unit = 1 if units is None else units.shape[1]
        cap = layer_limit if units is None else units.numel()
        width = max(width, min(-(-target_size // unit) * unit, cap))
    return width


def _wanted_widths(
    root: nn.Module,
    structure: ModelStructure,
    config: S2FTConfig,
    adapters: list[str],
    layers: dict[str, S2FTTunerLayer],
    kwargs: dict,
) -> dict[str, tuple[str, int]]:
    """path -> (axis, largest width any of `adapters` trains there), every file checked as a load checks it."""
    wanted: dict[str, tuple[str, int]] = {}
    for adapter in adapters:
        _, _, checked = _checked_adapter(root, structure, config, adapter, kwargs)
        for path, (axis, indices) in checked.items():
            if path in layers:
                _check_same_kind(path, layers[path], axis)
            width = max(_width(indices), wanted.get(path, (axis, 0))[1])
            wanted[path] = (axis, width)
    return wanted


def _module_limit(root: nn.Module, structure: ModelStructure, path: str) -> int:
    """Positions (per expert) a trainable module offers on the axis S2FT trains, S2FT layer or not."""
    block, role = structure.trainable_paths()[path]
    if role == EXPERTS:
        return block.num_channels
    out_features, in_features = features(base_layer_of(root.get_submodule(path)))
    return in_features if block.trained[role].axis == COLUMNS else out_features


def _fresh_indices(structure: ModelStructure, path: str, units: torch.Tensor | None, limit: int, width: int):
    """Zero-delta positions for a layer the adapter does not train yet: the first whole units (channels per expert)."""
    block, role = structure.trainable_paths()[path]
    if role == EXPERTS:
        return torch.arange(width).expand(block.num_experts, width).clone()
    return _free_positions(torch.empty(0, dtype=torch.long), width, units, limit)


def _grow_layer(layer: S2FTTunerLayer, adapter_name: str, indices: torch.Tensor) -> None:
    """Give the adapter `indices` (its own first, then padding) and a delta that keeps its values, zero elsewhere."""
    param = layer.s2ft_delta[adapter_name]
    values = param.detach().clone()
    layer.resize_adapter(adapter_name, indices)  # same Parameter, zero delta of the new shape, checked indices
    param.grad = None  # a gradient of the old shape could not accumulate into the new one
    with torch.no_grad():
        param.narrow(_delta_dim(layer), 0, values.shape[_delta_dim(layer)]).copy_(values)


def _add_zero_layer(
    root: nn.Module, path: str, axis: str, indices: torch.Tensor, adapter_name: str, reference: S2FTTunerLayer
) -> None:
    """Make `path` hold `adapter_name` with a zero delta, active, trainable and typed like the adapter's other
    layers (`reference`), leaving the layer's other adapters as they were."""
    module = root.get_submodule(path)
    trainable = {n: d.requires_grad for n, d in module.s2ft_delta.items()} if isinstance(module, S2FTTunerLayer) else {}
    parent_path, _, child = path.rpartition(".")
    layer = attach_planned(root.get_submodule(parent_path), child, adapter_name, axis, indices, init_weights=True)
    layer.set_adapter(reference.active_adapters)
    layer._disable_adapters = reference._disable_adapters
    if hasattr(reference, "_model_peft_config"):  # what the tuner records on every layer (convert_to_lora reads it)
        layer._model_peft_config = reference._model_peft_config
    model_delta = reference.s2ft_delta[adapter_name]
    delta = layer.s2ft_delta[adapter_name]
    delta.data = delta.data.to(dtype=model_delta.dtype)
    delta.requires_grad_(model_delta.requires_grad)
    for name, flag in trainable.items():
        layer.s2ft_delta[name].requires_grad_(flag)


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    adapters: list[str] | str | None = None,
    target_size: int | None = None,
    adapter_name: str = "default",
) -> None:
    """Make room in adapter `adapter_name` for every adapter that will be hot-swapped into it, before
    `torch.compile`, so later swaps never change a tensor's shape (and never recompile).

    Every layer of the adapter is padded with zero-delta entries to the largest selection among `adapters` (folders
    or hub ids, each checked as a load checks it) and/or to `target_size` positions (columns or rows; channels per
    expert on fused experts), rounded up to whole heads/channels and capped at what the layer can train. Layers one
    of `adapters` trains and this adapter does not become S2FT layers holding `adapter_name` with a zero delta.
    The deltas are zero, so the model's outputs do not change.

    Refused before anything changes: a compiled model (prepare first, then compile), permute mode, a merged
    adapter, an unknown adapter, nothing to do (neither `adapters` nor `target_size`), and any file a swap would
    refuse. Hub ids are read with the default download settings (a token from `hf auth login` or HF_TOKEN).
    The padded adapter saves and reloads as an ordinary adapter; a gradient of a resized delta is dropped.
    """
    if _is_compiled(model):
        raise ValueError(
            "The model is already compiled: preparing it now changes shapes under the compiled graph. Call "
            "prepare_model_for_compiled_hotswap on the uncompiled model, then torch.compile it."
        )
    if adapters is None and target_size is None:
        raise ValueError("Nothing to prepare: pass the adapters to be swapped in (adapters=[...]) and/or target_size.")
    if target_size is not None and (type(target_size) is not int or target_size < 1):
        raise ValueError(f"target_size={target_size!r} must be a positive number of columns (rows) per layer.")
    root, configs = _root_and_configs(model)
    config = _adapter_config(configs, adapter_name)
    layers = _adapter_layers(root, adapter_name)
    _refuse_permute_mode(config, layers, adapter_name)
    _refuse_merged(layers, adapter_name)
    structure = describe(root)
    adapters = [adapters] if isinstance(adapters, str) else list(adapters or ())
    wanted = _wanted_widths(root, structure, config, adapters, layers, {})

    grow, add = [], []
    for path, layer in layers.items():
        current = layer.selected(adapter_name)
        units = _unit_positions(structure, path)
        limit = layer.intermediate_size if isinstance(layer, S2FTExpertsLayer) else layer.index_limit
        width = _target_width(limit, units, target_size, wanted.get(path, ("", 0))[1], _width(current))
        if width > _width(current):
            grow.append((layer, _padded_indices(layer, units, current, width)))
    for path in sorted(set(wanted) - set(layers)):
        axis, needed = wanted[path]
        units, limit = _unit_positions(structure, path), _module_limit(root, structure, path)
        width = _target_width(limit, units, target_size, needed, 0)
        add.append((path, axis, _fresh_indices(structure, path, units, limit, width)))
    for layer, indices in grow:
        _grow_layer(layer, adapter_name, indices)
    reference = next(iter(layers.values()))
    for path, axis, indices in add:
        _add_zero_layer(root, path, axis, indices, adapter_name, reference)


__all__ = ["KEPT_CONFIG_FIELDS", "hotswap_adapter", "prepare_model_for_compiled_hotswap"]
