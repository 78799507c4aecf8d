"""The S2FT tuner layer: a frozen nn.Linear plus, per adapter, a dense delta on a few columns or rows."""

from __future__ import annotations

import warnings

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from . import quantized
from .linear_like import features, is_linear_like, logical_weight
from .mixed_batch import GROUPS_KWARG, RowGroups, add_rows_contribution, current_groups
from .partial_backprop import COLUMNS, ROWS, base_plus_sparse_delta, sparse_delta_linear


class S2FTTunerLayer(nn.Module, BaseTunerLayer):
    """What every S2FT layer is (a linear layer's, an experts module's), so PEFT finds them all by one class, and
    the bookkeeping they share: per adapter a delta, its indices (with CPU copies) and how it starts.

    Subclasses hold `s2ft_delta`, `s2ft_indices`, `_index_master`, `_init_weights` and define `delta_shape`,
    `_checked_indices` and `_index_device`.
    """

    adapter_layer_names = ("s2ft_delta",)
    other_param_names = ("s2ft_indices", "s2ft_merge_backup")

    def selected(self, adapter_name: str) -> torch.Tensor:
        """The adapter's indices as a CPU tensor; real values also while the layer is on the meta device."""
        return self._index_master[adapter_name]

    def _set_indices(self, adapter_name: str, indices: torch.Tensor) -> None:
        self._index_master[adapter_name] = indices
        self.s2ft_indices[adapter_name] = indices.to(self._index_device())

    def _initialize_delta(self, adapter_name: str) -> None:
        delta = self.s2ft_delta[adapter_name]
        if delta.is_meta:
            return
        with torch.no_grad():
            if self._init_weights[adapter_name]:
                delta.zero_()
            else:
                delta.normal_(std=0.1)

    def resize_adapter(self, adapter_name: str, indices: torch.Tensor) -> None:
        """Give an adapter another selection (loading a file whose indices differ from the config's).

        The Parameter object stays, so an optimizer built before the load keeps updating it (its state for the old
        shape fails loudly at the next step if the count changed).
        """
        indices = self._checked_indices(adapter_name, indices)
        param = self.s2ft_delta[adapter_name]
        param.data = torch.zeros(self.delta_shape(indices.shape[-1]), dtype=param.dtype, device=param.device)
        self._set_indices(adapter_name, indices)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._index_master.pop(adapter_name, None)
        self._init_weights.pop(adapter_name, None)

    def _apply(self, fn, recurse: bool = True):
        """Keep indices and fresh deltas meaningful through `to_empty` (meta-device construction).

        `to_empty` gives every tensor uninitialized memory. Indices are restored from their CPU copies; a delta
        that was created on the meta device gets its initial value (zero, or random with init_weights=False).
        """
        was_meta = {name: delta.is_meta for name, delta in self.s2ft_delta.items()}
        result = super()._apply(fn, recurse)
        for name in list(self.s2ft_indices.keys()):
            device = self.s2ft_indices[name].device
            if device.type != "meta":
                self.s2ft_indices[name] = self._index_master[name].to(device)
        for name, delta in self.s2ft_delta.items():
            if was_meta.get(name) and not delta.is_meta:
                self._initialize_delta(name)
        return result


class S2FTLayer(S2FTTunerLayer):
    """Wraps the base linear layer; `s2ft_delta[name]` is the trainable block, `s2ft_indices[name]` its
    columns (axis "in") or rows (axis "out") in the model's ORIGINAL coordinates.

    The base is an nn.Linear or a transformers Conv1D (GPT-2, weight stored (in, out)); deltas, indices and the
    checkpoint always refer to the (out, in) orientation, so both look the same from outside.

    The base weight is only read by the forward and backward. In permute mode (see permutation.py) the coupled
    weights are co-permuted once, so the block's columns sit contiguously at `block_range`. Merging writes the
    deltas into the weight and keeps the columns it overwrote, so unmerging restores them bit for bit.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        adapter_name: str,
        axis: str,
        indices: torch.Tensor,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(base_layer, BaseTunerLayer) or not is_linear_like(base_layer):
            kind = f"{type(base_layer).__module__}.{type(base_layer).__qualname__}"
            raise TypeError(f"S2FT adapts torch.nn.Linear and transformers Conv1D layers only, got {kind}.")
        self.base_layer = base_layer
        self.axis = axis
        self.out_features, self.in_features = features(base_layer)
        self.s2ft_delta = nn.ParameterDict({})
        self.s2ft_indices = BufferDict({}, persistent=True)
        # The weight's columns (rows) as they were before each merged adapter was merged in.
        self.s2ft_merge_backup = BufferDict({}, persistent=False)
        # CPU copies of the indices: the buffers above lose their values when a model built on the meta device
        # is materialized with `to_empty`; see `_apply`.
        self._index_master: dict[str, torch.Tensor] = {}
        self._init_weights: dict[str, bool] = {}
        self.block_range: tuple[int, int] | None = None  # permute mode: where the block sits in the weight
        self.permutation = None  # set by permutation.py when this layer owns a co-permutation
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, indices, init_weights)

    # ----------------------------------------------------------------------------------------------
    # adapters
    @property
    def dim(self) -> int:
        """The weight dimension the deltas index: 1 for columns, 0 for rows."""
        return 1 if self.axis == COLUMNS else 0

    @property
    def index_limit(self) -> int:
        return self.in_features if self.axis == COLUMNS else self.out_features

    def delta_shape(self, num_selected: int) -> tuple[int, int]:
        return (self.out_features, num_selected) if self.axis == COLUMNS else (num_selected, self.in_features)

    def update_layer(
        self,
        adapter_name: str,
        indices: torch.Tensor,
        init_weights: bool = True,
        inference_mode: bool = False,
    ) -> None:
        weight = self.get_base_layer().weight
        indices = self._checked_indices(adapter_name, indices)
        delta = torch.zeros(self.delta_shape(len(indices)), dtype=self._delta_dtype(), device=weight.device)
        self._init_weights[adapter_name] = init_weights
        # Adapters follow the base weight's dtype; PEFT upcasts half precision later unless told not to.
        self.s2ft_delta[adapter_name] = nn.Parameter(delta)
        self._initialize_delta(adapter_name)
        self._set_indices(adapter_name, indices)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _checked_indices(self, adapter_name: str, indices) -> torch.Tensor:
        indices = torch.as_tensor(indices).cpu()
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError(f"S2FT indices for adapter '{adapter_name}' must be integers, got {indices.dtype}.")
        indices = indices.long().clone()  # own storage, not a slice of one
        limit = self.index_limit
        if indices.ndim != 1 or len(indices) == 0 or int(indices.min()) < 0 or int(indices.max()) >= limit:
            raise ValueError(
                f"S2FT indices for adapter '{adapter_name}' must be a non-empty 1-D range in [0, {limit})."
            )
        if len(torch.unique(indices)) != len(indices):
            raise ValueError(f"S2FT indices for adapter '{adapter_name}' contain duplicates.")
        return indices

    def _delta_dtype(self) -> torch.dtype:
        return self.get_base_layer().weight.dtype

    def _index_device(self) -> torch.device:
        return self.get_base_layer().weight.device

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in) (a view for Conv1D, whose parameter is stored (in, out))."""
        base = self.get_base_layer()
        return logical_weight(base)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense delta against the ORIGINAL base weight (also in permute mode), in the weight's own storage
        orientation as PEFT's layers return it: (out, in), or (in, out) for a Conv1D (which `convert_to_lora`
        expects). Zero for another adapter of the model that does not cover this layer (`convert_to_lora` asks every
        tuner layer); an adapter the model does not have is refused, see `supports_lora_conversion`."""
        weight = self.base_weight()
        dense = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
        if adapter_name in self.s2ft_delta:
            delta = self.s2ft_delta[adapter_name].detach().to(weight.dtype)
            dense.index_copy_(self.dim, self.s2ft_indices[adapter_name].to(weight.device), delta)
        else:
            self.supports_lora_conversion(adapter_name)
        return logical_weight(self.get_base_layer(), dense).contiguous()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """True: a delta on |S| columns (rows) has rank <= |S|, and an adapter of the model that does not cover this
        layer leaves it unchanged, so a LoRA reproduces both exactly.

        `convert_to_lora` asks every tuner layer of the model about the adapter, also layers that only hold others.
        A layer without it answers True only when it can tell the name belongs to the model (the tuner records the
        model's adapter configs as `_model_peft_config`): a misspelt name would otherwise convert to a LoRA of zeros.
        """
        known = getattr(self, "_model_peft_config", None)
        if adapter_name in self.s2ft_delta or (known is not None and adapter_name in known):
            return True
        if known is not None:
            raise ValueError(
                f"The model has no adapter named '{adapter_name}' (its adapters: {', '.join(sorted(known))})."
            )
        raise ValueError(
            f"This S2FT layer ({self.get_base_layer().__class__.__name__}) does not hold adapter '{adapter_name}' (it "
            f"holds {', '.join(sorted(self.s2ft_delta))}) and cannot tell whether another layer of the model does. "
            "Check the adapter name, or export the adapter exactly with peft_s2ft.export.export_lora(model, folder, "
            "adapter_name), which writes only the layers that hold it."
        )

    def location(self, adapter_name: str) -> tuple[tuple[int, int] | None, torch.Tensor]:
        """Where the adapter's block sits in the weight as stored now: a range (permute mode) or its indices."""
        return self.block_range, self.s2ft_indices[adapter_name]

    # ----------------------------------------------------------------------------------------------
    # merging (PEFT contract): write the block in, keep what it overwrote, restore that by copy
    def _read_block(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        where, index = self.location(adapter_name)
        if where is not None:
            return weight.narrow(self.dim, where[0], where[1] - where[0]).clone()
        return weight.index_select(self.dim, index.to(weight.device))

    def _write_block(self, weight: torch.Tensor, adapter_name: str, values: torch.Tensor) -> None:
        where, index = self.location(adapter_name)
        if where is not None:
            weight.narrow(self.dim, where[0], where[1] - where[0]).copy_(values)
        else:
            weight.index_copy_(self.dim, index.to(weight.device), values)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.base_weight().data
        for name in adapter_names:
            if name not in self.s2ft_delta:
                continue
            original = self._read_block(weight, name)
            delta = self.s2ft_delta[name].detach()
            # Added in the wider of the two dtypes and rounded once.
            wide = torch.promote_types(weight.dtype, delta.dtype)
            merged = (original.to(wide) + delta.to(device=weight.device, dtype=wide)).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            self._write_block(weight, name, merged)
            self.s2ft_merge_backup[name] = original
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.base_weight().data
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self._write_block(weight, name, self.s2ft_merge_backup[name].to(weight.device))
            del self.s2ft_merge_backup[name]

    # ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        groups = kwargs.pop(GROUPS_KWARG, None) or current_groups()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if groups is not None:
            return self._mixed_batch_forward(x, groups, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.s2ft_delta]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        if self.permutation and not all(entry.still_in_place() for entry in self.permutation):
            raise RuntimeError(
                "A module that S2FT co-permuted (permute=True) was wrapped by another PEFT method afterwards. Its "
                "weight is stored permuted, so that method would compute on the wrong rows or columns. Combine "
                "methods with S2FT's default mode (permute=False), or merge one of them first."
            )
        # Permute mode has one adapter, whose block sits at a contiguous range; otherwise each adapter's indices.
        spec = tuple((self.axis, self.block_range) for _ in active)
        deltas = [self.s2ft_delta[name] for name in active]
        indices = [] if self.block_range is not None else [self.s2ft_indices[name] for name in active]
        return self._adapted_forward(x, spec, deltas, indices, *args, **kwargs)

    def _adapted_forward(self, x: torch.Tensor, spec, deltas, indices, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        return sparse_delta_linear(x, logical_weight(base), base.bias, spec, *deltas, *indices)

    def _mixed_batch_forward(self, x: torch.Tensor, groups: RowGroups, *args, **kwargs) -> torch.Tensor:
        """The frozen matmul once for the whole batch, then each adapter's contribution on its rows only."""
        if self.merged:
            raise ValueError(
                f"Cannot pass `adapter_names` while adapter(s) {', '.join(self.merged_adapters)} are merged into the "
                "base weights: every row would see them. Call unmerge_adapter() first."
            )
        out = self.base_layer(x, *args, **kwargs)
        for name, rows in groups.rows_of(x, type(self.get_base_layer()).__name__):
            if name not in self.s2ft_delta:
                continue
            where, index = self.location(name)
            add_rows_contribution(out, x, rows, self.axis, where, index, self.s2ft_delta[name])
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Every torch-level load (also a user's own `load_state_dict`) passes here before the adapter tensors are
        # copied: check them against this layer and make the layer fit the file's selection.
        from .checkpoint import conform_layer_to_entries

        conform_layer_to_entries(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __repr__(self) -> str:
        return "s2ft." + super().__repr__()

    def extra_repr(self) -> str:
        return f"axis={'columns' if self.axis == COLUMNS else 'rows'}"


class QuantizedS2FTLayer(S2FTLayer):
    """S2FT on a quantized linear layer (QS2FT; the storage is described in quantized.py).

    The quantized weight is never written by forward or backward: the forward calls the quantized layer itself and
    adds each delta's contribution, the backward takes the input gradient from the dequantized weight (transiently)
    and saves only x[..., S]. Deltas are float32 parameters. Merging dequantizes, adds the deltas and requantizes
    (with PEFT's rounding warning) and keeps the original quantized storage, so unmerging restores it exactly.
    """

    def __init__(self, base_layer: nn.Linear, *args, **kwargs) -> None:
        self.quantization = quantized.format_of(base_layer)
        super().__init__(base_layer, *args, **kwargs)
        # The model's quantization config, which torchao needs to requantize merged values (set by the tuner).
        self.quantization_recipe = None
        self._merge_storage: dict[str, tuple] = {}  # per merged adapter, the quantized storage it replaced

    def _delta_dtype(self) -> torch.dtype:
        return quantized.DELTA_DTYPE

    def dequantized_weight(self) -> torch.Tensor:
        """The base weight as (out, in), dequantized into a new tensor (the stored weight is not touched)."""
        return self.quantization.dequantize(self.get_base_layer())

    def base_weight(self) -> torch.Tensor:
        raise TypeError(
            f"The base weight of this S2FT layer is stored quantized ({self.quantization.name}); read it with "
            "dequantized_weight()."
        )

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense (out, in) delta in the deltas' dtype (float32), zero outside the adapter's columns (rows)."""
        delta = self.s2ft_delta.get(adapter_name)
        if delta is None:
            self.supports_lora_conversion(adapter_name)
            return torch.zeros(self.out_features, self.in_features, dtype=quantized.DELTA_DTYPE)
        dense = torch.zeros(self.out_features, self.in_features, dtype=delta.dtype, device=delta.device)
        dense.index_copy_(self.dim, self.s2ft_indices[adapter_name].to(delta.device), delta.detach())
        return dense

    def _base_input_grad(self, grad_out: torch.Tensor) -> torch.Tensor:
        """grad_out @ W with W dequantized for this product only (as bitsandbytes' own backward does)."""
        return grad_out @ self.dequantized_weight().to(device=grad_out.device, dtype=grad_out.dtype)

    def _adapted_forward(self, x: torch.Tensor, spec, deltas, indices, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        if base.weight.requires_grad:
            raise ValueError(
                f"The quantized weight of this layer ({self.quantization.name}) requires grad, but a quantized weight "
                "cannot be trained: freeze it (peft.prepare_model_for_kbit_training does) and train the S2FT delta."
            )

        def frozen(inputs: torch.Tensor) -> torch.Tensor:
            return base(inputs, *args, **kwargs)

        return base_plus_sparse_delta(x, frozen, self._base_input_grad, base.bias, spec, *deltas, *indices)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.s2ft_delta]
        if adapter_names:
            quantized.warn_rounding(self.quantization, "Merging")
        base = self.get_base_layer()
        for name in adapter_names:
            values = self.dequantized_weight()
            wide = torch.promote_types(values.dtype, quantized.DELTA_DTYPE)
            delta = self.s2ft_delta[name].detach().to(device=values.device, dtype=wide)
            merged = values.to(wide).index_add_(self.dim, self.s2ft_indices[name].to(values.device), delta)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            storage = self.quantization.storage(base)
            self.quantization.quantize(base, merged.to(values.dtype), self.quantization_recipe)
            self._merge_storage[name] = storage
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.quantization.restore(base, self._merge_storage.pop(name))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantized={self.quantization.name}"


def attach(
    parent: nn.Module, child_name: str, adapter_name: str, axis: str, indices: torch.Tensor, init_weights: bool
) -> S2FTLayer:
    """Wrap the linear `parent.<child_name>` (or add an adapter to its S2FT layer) training `indices`."""
    target = getattr(parent, child_name)
    if isinstance(target, S2FTLayer):
        if target.axis != axis:
            names = lambda a: "input columns" if a == COLUMNS else "output rows"  # noqa: E731
            raise ValueError(
                f"'{child_name}' already trains {names(target.axis)} for adapter(s) {', '.join(target.s2ft_delta)}; "
                f"adapter '{adapter_name}' would train its {names(axis)}, which one layer cannot do for two adapters "
                "(an S2FT adapter with train_v / train_up and a PaCA adapter on the same layer). Target other layers."
            )
        target.update_layer(adapter_name, indices, init_weights)
        return target
    layer_class = QuantizedS2FTLayer if quantized.is_quantized(target) else S2FTLayer
    layer = layer_class(target, adapter_name, axis, indices, init_weights)
    setattr(parent, child_name, layer)
    return layer


__all__ = ["S2FTLayer", "S2FTTunerLayer", "QuantizedS2FTLayer", "COLUMNS", "ROWS", "attach"]
