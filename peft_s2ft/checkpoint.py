"""Loading an adapter file: check it against the base model, then make the model's layers match it.

The file is the truth about the selection (indices in original coordinates): the config's seed or a
weight-based strategy may pick differently on this copy of the base model, and a global allocation
may spread units over other layers.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .config import S2FTConfig
from .layer import S2FTLayer
from .partial_backprop import COLUMNS
from .peft_type import PREFIX
from .structures import ATTENTION_NAMES, FFN_NAMES, discover_structure

DELTA, INDICES = f"{PREFIX}delta", f"{PREFIX}indices"
CHECKPOINT_PREFIX = "base_model.model."


class AdapterMismatchError(ValueError):
    """The adapter file does not fit this base model."""


def refuse_module_like_adapter_names(peft_config: dict) -> None:
    """Adapter names equal to a module path segment silently truncate saved checkpoints (PEFT #3584)."""
    reserved = {
        "model",
        "layers",
        "self_attn",
        "mlp",
        "base_layer",
        *ATTENTION_NAMES,
        *FFN_NAMES,
        DELTA,
        INDICES,
    }
    for name in peft_config:
        if name in reserved:
            raise ValueError(
                f"Adapter name '{name}' is also the name of a module in the model, which corrupts saved "
                "checkpoints (PEFT issue 3584). Choose another adapter name."
            )


def _root(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The transformers model inside, and the active adapters (when wrapped by PEFT)."""
    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, BaseTuner):
        return tuner.model, tuner.active_adapters
    return model, []


def _entries(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        for kind in (DELTA, INDICES):
            if key.endswith("." + kind):
                path = key[: -len(kind) - 1].removeprefix(CHECKPOINT_PREFIX)
                entries.setdefault(path, {})[kind] = value
    return entries


def _check(root: nn.Module, entries: dict[str, dict[str, torch.Tensor]]) -> dict[str, str]:
    """Validate every layer of the file; return path -> axis. Raises before anything is modified."""
    structure = discover_structure(root)
    axes = {}
    for path, found in entries.items():
        missing = {DELTA, INDICES} - set(found)
        if missing:
            raise AdapterMismatchError(f"Adapter file: layer '{path}' has no {sorted(missing)[0]} entry.")
        role = structure.role_of(path)
        if role is None or role[0] not in ("o_proj", "down_proj", "v_proj", "up_proj"):
            raise AdapterMismatchError(
                f"Adapter file: layer '{path}' is not an output/down/value/up projection of this base model "
                f"({type(root).__name__}); the adapter was made for another model."
            )
        linear = root.get_submodule(path)
        while hasattr(linear, "base_layer"):
            linear = linear.base_layer
        axis = COLUMNS if role[0] in ("o_proj", "down_proj") else "out"
        indices, delta = found[INDICES], found[DELTA]
        limit = linear.in_features if axis == COLUMNS else linear.out_features
        if indices.ndim != 1 or indices.dtype.is_floating_point or len(indices) == 0:
            raise AdapterMismatchError(f"Adapter file: layer '{path}' has malformed indices {tuple(indices.shape)}.")
        if int(indices.min()) < 0 or int(indices.max()) >= limit:
            raise AdapterMismatchError(
                f"Adapter file: layer '{path}' has indices up to {int(indices.max())}, but the base model's layer "
                f"has only {limit} {'input columns' if axis == COLUMNS else 'output rows'}."
            )
        if len(torch.unique(indices)) != len(indices):
            raise AdapterMismatchError(f"Adapter file: layer '{path}' has duplicate indices.")
        expected = (linear.out_features, len(indices)) if axis == COLUMNS else (len(indices), linear.in_features)
        if tuple(delta.shape) != expected:
            raise AdapterMismatchError(
                f"Adapter file: layer '{path}' has a delta of shape {tuple(delta.shape)}, but this base model "
                f"needs {expected}; the adapter was made for a model of another size."
            )
        axes[path] = axis
    return axes


def conform_model_to_checkpoint(
    model: nn.Module, config: S2FTConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Make `adapter_name`'s layers train exactly the file's indices; return the state dict to load."""
    from . import permutation
    from .model import attach

    root, active = _root(model)
    entries = _entries(state_dict)
    try:
        _check(root, entries)
    except AdapterMismatchError:
        # Loading injected this adapter's layers before reading the file: take them out again, so the
        # caller's model is left with the modules and weights it had.
        _remove_adapter_everywhere(root, adapter_name, config)
        raise
    if not entries:
        return state_dict

    if config.permute:
        permutation.unpermute_model(root)
    current = {
        name
        for name, module in root.named_modules()
        if isinstance(module, S2FTLayer) and adapter_name in module.s2ft_delta
    }
    for path, found in entries.items():
        indices = found[INDICES].long().cpu()
        module = root.get_submodule(path)
        if isinstance(module, S2FTLayer) and adapter_name in module.s2ft_delta:
            if not torch.equal(module.s2ft_indices[adapter_name].cpu(), indices):
                module.resize_adapter(adapter_name, indices)
        else:
            parent_path, _, child = path.rpartition(".")
            layer = attach(root.get_submodule(parent_path), child, adapter_name, indices, init_weights=True)
            layer.set_adapter(active or [adapter_name], inference_mode=config.inference_mode)
    for path in current - set(entries):
        _remove_adapter(root, path, adapter_name)
    if not config.permute:
        return state_dict

    permutation.permute_model(root, adapter_name)
    aligned = dict(state_dict)
    for key in state_dict:
        if key.endswith("." + DELTA):
            path = key[: -len(DELTA) - 1].removeprefix(CHECKPOINT_PREFIX)
            layer = root.get_submodule(path)
            file_indices = entries[path][INDICES].long()
            layer_indices = layer.s2ft_indices[adapter_name].cpu()
            dim = 1 if layer.axis == COLUMNS else 0
            aligned[key] = permutation._align(state_dict[key], file_indices, layer_indices, dim)
            aligned[key[: -len(DELTA)] + INDICES] = layer_indices.to(state_dict[key].device)
    return aligned


def _remove_adapter(root: nn.Module, path: str, adapter_name: str) -> None:
    layer = root.get_submodule(path)
    layer.delete_adapter(adapter_name)
    if not layer.s2ft_delta:
        parent_path, _, child = path.rpartition(".")
        setattr(root.get_submodule(parent_path), child, layer.get_base_layer())


def _remove_adapter_everywhere(root: nn.Module, adapter_name: str, config: S2FTConfig) -> None:
    from . import permutation

    if config.permute:
        permutation.unpermute_model(root)
    for path, module in list(root.named_modules()):
        if isinstance(module, S2FTLayer) and adapter_name in module.s2ft_delta:
            _remove_adapter(root, path, adapter_name)
