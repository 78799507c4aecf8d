"""Loading an adapter: read the file safely, check it against the base model, make the layers match it.

The file is the truth about the selection (indices in original coordinates): the config's seed or a
weight-based strategy may pick differently on this copy of the base model, and a global allocation may
spread units over other layers. Every load path runs the same checks before a single tensor is copied:

- `PeftModel.from_pretrained`, `PeftModel.load_adapter`, `AutoPeftModel*`: the config read by
  `S2FTConfig.from_pretrained` knows where its adapter file is, so injection reads and checks the file first
  (`AdapterSource.read`, `check_checkpoint`) and builds exactly its layers; a refused file leaves the model
  untouched.
- PEFT's `set_peft_model_state_dict` (also after the above): `S2FTModel._remap_adapter_state_dict_for_load`
  calls `conform_model_to_checkpoint`.
- transformers' `model.load_adapter` loads through `_load_pretrained_model` and never calls that hook; a one-call
  bridge installed at injection (`LoadAdapterBridge`) runs the same checks there and undoes the injection when
  the file is refused.
- torch's `load_state_dict` (also a user's own): `S2FTModel._load_from_state_dict` checks every layer before the
  first tensor is copied, and `S2FTLayer._load_from_state_dict` checks its own (when injected without a tuner).
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from . import permutation
from .architectures import EXPERTS, describe
from .architectures.discovery import base_layer_of
from .experts import S2FTExpertsLayer, attach_experts
from .layer import S2FTLayer, S2FTTunerLayer, attach
from .linear_like import features, is_linear_like
from .partial_backprop import COLUMNS
from .peft_type import PREFIX

DELTA, INDICES = f"{PREFIX}delta", f"{PREFIX}indices"
CHECKPOINT_PREFIX = "base_model.model."


PERMUTE_EXPERTS = (
    "S2FTConfig.permute=True does not support fused mixture-of-experts layers yet (their channels would have to move "
    "per expert). Use permute=False: the default mode trains the same adapter on experts, with partial "
    "back-propagation."
)


class AdapterMismatchError(ValueError):
    """The adapter file does not fit this base model, or is not a well-formed S2FT adapter."""


def refuse_module_like_adapter_names(peft_config: dict, segments: set[str]) -> None:
    """Adapter names equal to a module path segment silently truncate saved checkpoints (PEFT #3584).

    `segments`: those of the paths the method's checkpoint keys are made of.
    """
    reserved = {"model", "base_model", "base_layer", DELTA, INDICES} | segments
    for name in peft_config:
        if name in reserved:
            raise ValueError(
                f"Adapter name '{name}' is also the name of a module in the model, which corrupts saved "
                "checkpoints (PEFT issue 3584). Choose another adapter name."
            )


# --------------------------------------------------------------------------------------------------
# reading the file
@dataclass
class AdapterSource:
    """Where an adapter's config was read from, so its weights file can be read before injection."""

    model_id: str
    subfolder: str | None = None
    download_kwargs: dict = field(default_factory=dict)
    fingerprint: tuple = ()  # the config's selection fields when it was read

    def read(self) -> dict[str, torch.Tensor] | None:
        """The adapter's tensors, or None when the folder holds no weights file (a config on its own)."""
        folder = os.path.join(self.model_id, self.subfolder) if self.subfolder else self.model_id
        if os.path.isdir(folder):
            safetensors_file, pickle_file = (os.path.join(folder, n) for n in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME))
            if os.path.isfile(safetensors_file):
                return read_safetensors(safetensors_file)
            if os.path.isfile(pickle_file):
                return read_pickle(pickle_file)
            return None
        return self._read_from_hub()

    def _read_from_hub(self) -> dict[str, torch.Tensor] | None:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

        kwargs = {k: v for k, v in self.download_kwargs.items() if v is not None}
        if constants.HF_HUB_OFFLINE:
            kwargs["local_files_only"] = True
        try:
            path = hf_hub_download(self.model_id, SAFETENSORS_WEIGHTS_NAME, subfolder=self.subfolder, **kwargs)
        except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError):
            path = None
        if path is not None:
            return read_safetensors(path)
        try:
            path = hf_hub_download(self.model_id, WEIGHTS_NAME, subfolder=self.subfolder, **kwargs)
        except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError):
            return None
        return read_pickle(path)


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except SafetensorError as error:
        raise AdapterMismatchError(
            f"Adapter file '{path}' is not a complete safetensors file ({error}); it may have been truncated by an "
            "interrupted download or save. Download or save it again."
        ) from error


def read_pickle(path: str) -> dict[str, torch.Tensor]:
    """A pickled adapter (`save_pretrained(safe_serialization=False)`), through torch's weights-only unpickler.

    That unpickler rebuilds tensors and plain containers and refuses everything else before calling it, so a
    file that would run code when unpickled is refused with nothing in it executed.
    """
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise AdapterMismatchError(
            f"Adapter file '{path}' is a pickle holding objects other than tensors; peft_s2ft refused it, and nothing "
            f"in it was executed. Save adapters with safetensors (the default of save_pretrained). ({error})"
        ) from error
    except (EOFError, RuntimeError) as error:
        raise AdapterMismatchError(
            f"Adapter file '{path}' is not a complete pickle of tensors ({error}); save or download it again."
        ) from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise AdapterMismatchError(f"Adapter file '{path}' does not hold a dict of tensors.")
    return state_dict


def read_checkpoint_files(files: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of the files transformers resolved (it may name a safetensors file that is not there)."""
    state_dict = {}
    for path in map(str, files):
        if path.endswith(".safetensors") and not os.path.isfile(path):
            path = os.path.join(os.path.dirname(path), WEIGHTS_NAME)  # what transformers would fall back to
        if not os.path.isfile(path):
            raise AdapterMismatchError(f"No adapter weights file at '{path}'.")
        state_dict.update(read_safetensors(path) if path.endswith(".safetensors") else read_pickle(path))
    return state_dict


# --------------------------------------------------------------------------------------------------
# checking
def _entries(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Module path (relative to the transformers model) -> {"s2ft_delta": ..., "s2ft_indices": ...}."""
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        for kind in (DELTA, INDICES):
            if key.endswith("." + kind):
                path = key[: -len(kind) - 1].removeprefix(CHECKPOINT_PREFIX)
                entries.setdefault(path, {})[kind] = value
    return entries


def check_entry(
    where: str, in_features: int, out_features: int, axis: str, indices: torch.Tensor, delta: torch.Tensor | None
) -> torch.Tensor:
    """Validate one layer's indices and delta; return the indices as int64 on the CPU."""
    if not isinstance(indices, torch.Tensor) or indices.ndim != 1 or len(indices) == 0:
        shape = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise AdapterMismatchError(f"Adapter file: layer '{where}' has malformed indices {shape}.")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise AdapterMismatchError(
            f"Adapter file: layer '{where}' has indices of dtype {indices.dtype}; S2FT indices are integers."
        )
    indices = indices.detach().cpu().long()
    limit = in_features if axis == COLUMNS else out_features
    if int(indices.min()) < 0 or int(indices.max()) >= limit:
        raise AdapterMismatchError(
            f"Adapter file: layer '{where}' has indices from {int(indices.min())} up to {int(indices.max())}, but the "
            f"base model's layer has only {limit} {'input columns' if axis == COLUMNS else 'output rows'}."
        )
    if len(torch.unique(indices)) != len(indices):
        raise AdapterMismatchError(f"Adapter file: layer '{where}' has duplicate indices.")
    if delta is not None:
        if not delta.dtype.is_floating_point:
            raise AdapterMismatchError(f"Adapter file: layer '{where}' has a delta of dtype {delta.dtype}, not floats.")
        expected = (out_features, len(indices)) if axis == COLUMNS else (len(indices), in_features)
        if tuple(delta.shape) != expected:
            raise AdapterMismatchError(
                f"Adapter file: layer '{where}' has a delta of shape {tuple(delta.shape)}, but its {len(indices)} "
                f"indices on this base model need {expected}; the adapter was made for a model of another size."
            )
        if not delta.is_meta and not torch.isfinite(delta).all():
            raise AdapterMismatchError(f"Adapter file: layer '{where}' has non-finite values (NaN, inf) in its delta.")
    return indices


def _normalized(geometry: dict) -> dict:
    return json.loads(json.dumps(geometry))


def check_geometry(config, structure) -> None:
    """Refuse an adapter made for a base model of another family or geometry (files saved before this check was
    introduced carry none, and are checked unit by unit only)."""
    saved = getattr(config, "_loaded_geometry", getattr(config, "base_geometry", None))
    if not saved:
        return
    saved, current = _normalized(saved), _normalized(structure.geometry())
    if saved != current:
        differs = {
            k: (saved.get(k), current.get(k)) for k in current.keys() | saved.keys() if saved.get(k) != current.get(k)
        }
        raise AdapterMismatchError(
            "The adapter was made for a base model of another architecture: "
            + ", ".join(f"{k} {was} in the adapter, {now} here" for k, (was, now) in sorted(differs.items()))
            + ". Its indices would select other heads or channels on this model; load it onto the model it was "
            "trained on."
        )


def check_checkpoint(root: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]]:
    """Validate every S2FT layer of a file against `root`; return path -> (axis, indices). Modifies nothing."""
    entries = _entries(state_dict)
    if not entries:
        raise AdapterMismatchError(
            f"The adapter file holds no S2FT layer (no '.{DELTA}' / '.{INDICES}' entries among its "
            f"{len(state_dict)} tensors); it is not an S2FT adapter, or it was saved without its weights."
        )
    trainable = describe(root).trainable_paths()
    checked = {}
    for path, found in entries.items():
        missing = {DELTA, INDICES} - set(found)
        if missing:
            raise AdapterMismatchError(f"Adapter file: layer '{path}' has no {sorted(missing)[0]} entry.")
        if path not in trainable:
            raise AdapterMismatchError(
                f"Adapter file: layer '{path}' is not an output/down/value/up projection of this base model "
                f"({type(root).__name__}); the adapter was made for another model."
            )
        block, role = trainable[path]
        if role == EXPERTS:
            checked[path] = (EXPERTS, check_experts_entry(path, block, found[INDICES], found[DELTA]))
            continue
        span = block.trained[role]
        out_features, in_features = features(base_layer_of(root.get_submodule(path)))
        indices = check_entry(path, in_features, out_features, span.axis, found[INDICES], found[DELTA])
        check_whole_units(path, block, span, indices)
        checked[path] = (span.axis, indices)
    return checked


def check_column_checkpoint(
    root: nn.Module, state_dict: dict[str, torch.Tensor]
) -> dict[str, tuple[str, torch.Tensor]]:
    """Validate a file whose layers train input columns of any linear layer (PaCA); return path -> (axis, indices)."""
    entries = _entries(state_dict)
    if not entries:
        raise AdapterMismatchError(
            f"The adapter file holds no adapted layer (no '.{DELTA}' / '.{INDICES}' entries among its "
            f"{len(state_dict)} tensors); it is not a PaCA adapter, or it was saved without its weights."
        )
    checked = {}
    for path, found in entries.items():
        missing = {DELTA, INDICES} - set(found)
        if missing:
            raise AdapterMismatchError(f"Adapter file: layer '{path}' has no {sorted(missing)[0]} entry.")
        try:
            module = base_layer_of(root.get_submodule(path))
        except AttributeError:
            module = None
        if module is None or not is_linear_like(module):
            raise AdapterMismatchError(
                f"Adapter file: layer '{path}' is not a linear layer of this base model ({type(root).__name__}); the "
                "adapter was made for another model."
            )
        out_features, in_features = features(module)
        checked[path] = (COLUMNS, check_entry(path, in_features, out_features, COLUMNS, found[INDICES], found[DELTA]))
    return checked


def checked_file_plan(root: nn.Module, config, state_dict: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """The file's layers, checked as the config's method defines them: described units (S2FT) or any columns."""
    if getattr(config, "any_linear_layer", False):
        return check_column_checkpoint(root, state_dict)
    check_geometry(config, describe(root))
    return check_checkpoint(root, state_dict)


def check_whole_units(where: str, block, span, indices: torch.Tensor) -> None:
    """An S2FT adapter trains whole heads, K/V groups or channels: indices that split one were made for a model
    with another head layout (or edited by hand), and would train parts of this model's units."""
    count = block.num_groups if span.unit == "kv_group" else block.num_units
    positions = span.positions(torch.arange(count)).reshape(count, span.width)
    inside = torch.isin(positions, indices)
    partial = inside.any(dim=1) & ~inside.all(dim=1)
    outside = ~torch.isin(indices, positions)
    if bool(partial.any()) or bool(outside.any()):
        raise AdapterMismatchError(
            f"Adapter file: layer '{where}' has indices that do not form whole {span.unit.replace('_', ' ')}s of this "
            f"base model ({span.width} positions each); the adapter was made for a model with another layout."
        )


def check_experts_entry(where: str, block, indices: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """Validate an experts layer's [E, k] channels and [E, H, k] delta; return the indices as int64 on the CPU."""
    experts, hidden, channels = block.num_experts, block.hidden_size, block.num_channels
    if (
        not isinstance(indices, torch.Tensor)
        or indices.ndim != 2
        or indices.shape[0] != experts
        or not indices.shape[1]
    ):
        shape = tuple(indices.shape) if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise AdapterMismatchError(
            f"Adapter file: experts layer '{where}' has indices of shape {shape}; this base model needs [{experts}, k]."
        )
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise AdapterMismatchError(f"Adapter file: experts layer '{where}' has indices of dtype {indices.dtype}.")
    indices = indices.detach().cpu().long()
    if int(indices.min()) < 0 or int(indices.max()) >= channels:
        raise AdapterMismatchError(
            f"Adapter file: experts layer '{where}' has channel indices up to {int(indices.max())}, but each expert of "
            f"the base model has {channels} channels."
        )
    ordered = indices.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise AdapterMismatchError(f"Adapter file: experts layer '{where}' has duplicate channels within an expert.")
    if delta is not None:
        expected = (experts, hidden, indices.shape[1])
        if not delta.dtype.is_floating_point or tuple(delta.shape) != expected:
            raise AdapterMismatchError(
                f"Adapter file: experts layer '{where}' has a delta of {delta.dtype} {tuple(delta.shape)}; this base "
                f"model needs floats of shape {expected}."
            )
        if not delta.is_meta and not torch.isfinite(delta).all():
            raise AdapterMismatchError(f"Adapter file: experts layer '{where}' has non-finite values in its delta.")
    return indices


def check_experts_layer_entries(layer, state_dict: dict, prefix: str, align: bool = False) -> None:
    """A torch-level load into an experts layer can take only the channels it trains (per expert, in any order;
    with `align`, the incoming delta is reordered to the layer's order in `state_dict`)."""
    where = prefix.removesuffix(".").removeprefix(CHECKPOINT_PREFIX)
    for name in list(layer.s2ft_delta):
        raw, delta = state_dict.get(f"{prefix}{INDICES}.{name}"), state_dict.get(f"{prefix}{DELTA}.{name}")
        if raw is None and delta is None:
            continue
        refuse_loading_over_merged(layer, name, where)
        block = _ExpertsShape(layer.num_experts, layer.hidden_size, layer.intermediate_size)
        current = layer.selected(name)
        indices = check_experts_entry(where, block, current if raw is None else raw, delta)
        if torch.equal(indices.sort(dim=1).values, current.sort(dim=1).values):
            if align and not torch.equal(indices, current):
                # position of each of the layer's channels among the incoming ones, expert by expert
                order = (current[:, :, None] == indices[:, None, :]).float().argmax(dim=2)
                if delta is not None:
                    index = order.to(delta.device)[:, None, :].expand(-1, delta.shape[1], -1)
                    state_dict[f"{prefix}{DELTA}.{name}"] = delta.gather(2, index)
                state_dict[f"{prefix}{INDICES}.{name}"] = current.to(layer.s2ft_indices[name].device)
        else:
            raise AdapterMismatchError(
                f"State dict: experts layer '{where}' of adapter '{name}' holds other channels than the layer trains. "
                "Load adapter files with PeftModel.from_pretrained / load_adapter, which make the layers fit the file."
            )


@dataclass(frozen=True)
class _ExpertsShape:
    num_experts: int
    hidden_size: int
    num_channels: int


def attach_planned(parent: nn.Module, child: str, adapter_name: str, axis: str, indices, init_weights: bool):
    """Wrap (or extend) the module a plan entry names: a linear layer's columns/rows, or an experts module."""
    if axis == EXPERTS:
        return attach_experts(parent, child, adapter_name, indices, init_weights)
    return attach(parent, child, adapter_name, axis, indices, init_weights)


def _same_units(current: torch.Tensor, incoming: torch.Tensor) -> bool:
    """The same selection: the same set of indices (a linear layer), the same [E, k] channels (an experts layer)."""
    if current.ndim == 2:
        return torch.equal(current, incoming)
    return set(current.tolist()) == set(incoming.tolist())


def root_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel, or the model itself (adapter injected directly)."""
    tuner = getattr(model, "base_model", None)
    return tuner.model if isinstance(tuner, BaseTuner) else model


# --------------------------------------------------------------------------------------------------
# making the layers fit the file
def conform_model_to_checkpoint(
    model: nn.Module, config, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Make `adapter_name`'s layers train exactly the file's indices; return the state dict to load.

    Everything is checked before the first module changes, so a refused file leaves the model as it was.
    """
    root = root_model(model)
    checked = checked_file_plan(root, config, state_dict)
    current = {
        name: module
        for name, module in root.named_modules()
        if isinstance(module, S2FTTunerLayer) and adapter_name in module.s2ft_delta
    }
    for path, layer in current.items():
        refuse_loading_over_merged(layer, adapter_name, path)
    same_selection = set(current) == set(checked) and all(
        _same_units(current[path].selected(adapter_name), indices) for path, (_, indices) in checked.items()
    )
    if not same_selection:
        if config.permute and any(axis == EXPERTS for axis, _ in checked.values()):
            raise AdapterMismatchError(PERMUTE_EXPERTS)
        if config.permute:
            permutation.check_permutable(root)
            permutation.check_contiguous(root, checked)
            permutation.unpermute_model(root)
        active = next(iter(current.values())).active_adapters if current else [adapter_name]
        for path, (axis, indices) in checked.items():
            module = root.get_submodule(path)
            if isinstance(module, S2FTTunerLayer) and adapter_name in module.s2ft_delta:
                module.resize_adapter(adapter_name, indices)
            else:
                parent_path, _, child = path.rpartition(".")
                parent = root.get_submodule(parent_path)
                layer = attach_planned(parent, child, adapter_name, axis, indices, init_weights=True)
                layer.set_adapter(active, inference_mode=config.inference_mode)
        for path in set(current) - set(checked):
            remove_layer_adapter(root, path, adapter_name)
        if config.permute:
            permutation.permute_model(root, adapter_name)
    stop_awaiting_file(root, adapter_name)
    return _aligned_to_layers(root, adapter_name, state_dict, checked)


def _aligned_to_layers(root, adapter_name, state_dict, checked) -> dict[str, torch.Tensor]:
    """The file's deltas and indices in the order the layers hold them (a permute-mode block has its own)."""
    aligned = dict(state_dict)
    for key in state_dict:
        if key.endswith("." + DELTA):
            path = key[: -len(DELTA) - 1].removeprefix(CHECKPOINT_PREFIX)
            layer, file_indices = root.get_submodule(path), checked[path][1]
            layer_indices = layer.selected(adapter_name)
            if not torch.equal(layer_indices, file_indices):
                aligned[key] = permutation.align(state_dict[key], file_indices, layer_indices, layer.dim)
                aligned[key[: -len(DELTA)] + INDICES] = layer_indices.to(state_dict[key].device)
    return aligned


def _layer_entries(layer: S2FTLayer, state_dict: dict, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """Check a torch-level load of one layer's adapter tensors; return (adapter, incoming indices) pairs.

    Pure. A torch-level load copies tensors into the layers as they are, so it can only take the selection the
    layer trains, possibly in another order; loading another selection is what PEFT's loaders are for.
    """
    names = {
        key[len(prefix) :].split(".", 1)[1]
        for key in state_dict
        if key.startswith(prefix + DELTA + ".") or key.startswith(prefix + INDICES + ".")
    }
    where = prefix.removesuffix(".").removeprefix(CHECKPOINT_PREFIX)
    checked = []
    for name in sorted(names):
        if name not in layer.s2ft_delta:
            continue  # an adapter this layer does not have: torch reports the unexpected keys
        refuse_loading_over_merged(layer, name, where)
        delta, raw = state_dict.get(f"{prefix}{DELTA}.{name}"), state_dict.get(f"{prefix}{INDICES}.{name}")
        current = layer.selected(name)
        indices = check_entry(
            where, layer.in_features, layer.out_features, layer.axis, current if raw is None else raw, delta
        )
        if set(indices.tolist()) != set(current.tolist()):
            raise AdapterMismatchError(
                f"State dict: layer '{where}' of adapter '{name}' holds other units than the layer trains. Load "
                "adapter files with PeftModel.from_pretrained / load_adapter or set_peft_model_state_dict, which make "
                "the layers fit the file."
            )
        checked.append((name, indices))
    return checked


def conform_layer_to_entries(layer: S2FTLayer, state_dict: dict, prefix: str) -> None:
    """Check this layer's incoming adapter tensors and present them in the order the layer holds its indices."""
    for name, indices in _layer_entries(layer, state_dict, prefix):
        current = layer.selected(name)
        delta_key, index_key = f"{prefix}{DELTA}.{name}", f"{prefix}{INDICES}.{name}"
        if not torch.equal(current, indices) and state_dict.get(delta_key) is not None:
            state_dict[delta_key] = permutation.align(state_dict[delta_key], indices, current, layer.dim)
        if index_key in state_dict:
            state_dict[index_key] = current.to(layer.s2ft_indices[name].device)


def check_layers_before_loading(root: nn.Module, state_dict: dict, prefix: str) -> None:
    """Every S2FT layer's entries checked before torch copies the first tensor (torch loads layer by layer)."""
    for path, module in root.named_modules():
        if isinstance(module, S2FTLayer):
            _layer_entries(module, state_dict, f"{prefix}{path}.")
        elif isinstance(module, S2FTExpertsLayer):
            check_experts_layer_entries(module, state_dict, f"{prefix}{path}.")


def refuse_loading_over_merged(layer: S2FTLayer, adapter_name: str, where: str) -> None:
    if adapter_name in layer.merged_adapters:
        raise ValueError(
            f"Adapter '{adapter_name}' is merged into the base weights (layer '{where}'); loading over it would leave "
            "its old delta merged in. Call unmerge_adapter() first."
        )


# --------------------------------------------------------------------------------------------------
# taking an adapter out again
def remove_layer_adapter(root: nn.Module, path: str, adapter_name: str) -> None:
    """Take one adapter out of one layer, leaving the layer's other adapters active or not as they were.

    (PEFT's delete_adapter would activate another adapter in a layer that loses its only active one, while the
    rest of the model keeps the removed adapter's name active.)
    """
    layer = root.get_submodule(path)
    trainable = {name: delta.requires_grad for name, delta in layer.s2ft_delta.items()}
    layer._active_adapter = [name for name in layer.active_adapters if name != adapter_name]
    layer.delete_adapter(adapter_name)
    for name, delta in layer.s2ft_delta.items():
        delta.requires_grad_(trainable[name])
    if not layer.s2ft_delta:
        parent_path, _, child = path.rpartition(".")
        setattr(root.get_submodule(parent_path) if parent_path else root, child, layer.get_base_layer())


def undo_injection(root: nn.Module, adapter_name: str, requires_grad: dict[int, bool]) -> None:
    """Take `adapter_name`'s co-permutation and layers out of `root` and restore its `requires_grad` flags."""
    layers = [m for m in root.modules() if isinstance(m, S2FTLayer)]
    if any(layer.permutation is not None and adapter_name in layer.s2ft_delta for layer in layers):
        # Permute mode allows one adapter per model: these permutations are the removed adapter's.
        permutation.unpermute_model(root)
    for path, module in list(root.named_modules()):
        if isinstance(module, S2FTTunerLayer) and adapter_name in module.s2ft_delta:
            remove_layer_adapter(root, path, adapter_name)
    for param in root.parameters():
        if id(param) in requires_grad:
            param.requires_grad_(requires_grad[id(param)])


def snapshot_requires_grad(root: nn.Module) -> dict[int, bool]:
    return {id(p): p.requires_grad for p in root.parameters()}


AWAITING_FILE = "_s2ft_selections_awaiting_their_file"


def await_file_selection(model: nn.Module, adapter_name: str, strategy: str) -> None:
    """`adapter_name` was injected with a stand-in selection (a calibrated strategy cannot be re-run without its
    data): refuse every forward of `model` until a load makes its layers fit its file, or the adapter is gone."""
    waiting = model.__dict__.get(AWAITING_FILE)
    if waiting is None:
        waiting = model.__dict__[AWAITING_FILE] = {}

        def refuse(module, args, kwargs):
            configs = getattr(module, "peft_config", None) or {}
            pending = {name: how for name, how in waiting.items() if name in configs}
            if pending:
                name, how = next(iter(pending.items()))
                raise RuntimeError(
                    f"The S2FT adapter '{name}' (selection='{how}', chosen on calibration data) takes its heads and "
                    "channels from its adapter file, which is not loaded yet. Load it with model.load_adapter(path) or "
                    "PeftModel.from_pretrained(model, path); to train a new adapter, call "
                    "peft_s2ft.calibrate_selection(model, config, batches) first."
                )

        model.register_forward_pre_hook(refuse, with_kwargs=True)
    waiting[adapter_name] = strategy


def stop_awaiting_file(model: nn.Module, adapter_name: str) -> None:
    """Its file is loaded, or the name is being injected afresh: forwards no longer wait for `adapter_name`."""
    model.__dict__.get(AWAITING_FILE, {}).pop(adapter_name, None)


class LoadAdapterBridge:
    """transformers' `model.load_adapter` runs the checks of `conform_model_to_checkpoint` through this.

    transformers injects the layers from the config and then loads the file with `model._load_pretrained_model`,
    which never calls the tuner's remap hook. Installed as that attribute on the model instance when an S2FT adapter
    is injected directly (not through a PeftModel), it handles the next call only: reads the file (safetensors, or a
    pickle through torch's weights-only unpickler), checks it, makes the layers fit it, and on any failure takes the
    adapter out again, config entry included, before re-raising.
    """

    def __init__(self, adapter_name: str, requires_grad: dict[int, bool]) -> None:
        self.adapter_name = adapter_name
        self.requires_grad = requires_grad

    def install(self, model: nn.Module) -> None:
        model.__dict__["_load_pretrained_model"] = self

    def __call__(self, model, state_dict, checkpoint_files, load_config, expected_keys=None):
        if model.__dict__.get("_load_pretrained_model") is self:
            del model.__dict__["_load_pretrained_model"]
        load = type(model)._load_pretrained_model
        marker = f".{DELTA}.{self.adapter_name}"
        if not any(key.endswith(marker) for key in expected_keys or ()):
            return load(model, state_dict, checkpoint_files, load_config, expected_keys)  # another adapter's load
        try:
            if state_dict is None:
                state_dict = read_checkpoint_files(checkpoint_files or [])
            config = model.peft_config[self.adapter_name]
            state_dict = conform_model_to_checkpoint(model, config, self.adapter_name, state_dict)
            own = (f".{self.adapter_name}.", f".{self.adapter_name}")
            expected_keys = [n for n, _ in model.named_parameters() if n.endswith(own[1]) or own[0] in n]
            with permutation.state_dict_in_stored_order():
                return load(model, state_dict, None, load_config, expected_keys)
        except BaseException:
            undo_injection(model, self.adapter_name, self.requires_grad)
            model.peft_config.pop(self.adapter_name, None)
            if not model.peft_config:  # it was the model's first adapter: back to transformers' defaults
                del model.peft_config
                vars(model).pop("_hf_peft_config_loaded", None)
            raise
