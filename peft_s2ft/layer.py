"""The S2FT tuner layer: a frozen nn.Linear plus, per adapter, a dense delta on a few columns or rows."""

from __future__ import annotations

import warnings

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .partial_backprop import COLUMNS, ROWS, MergedBlockLinear, SparseDeltaLinear


class S2FTLayer(nn.Module, BaseTunerLayer):
    """Wraps the base linear layer; `s2ft_delta[name]` is the trainable block, `s2ft_indices[name]` its
    columns (axis "in") or rows (axis "out") in the model's ORIGINAL coordinates.

    In the default mode the base weight is never touched. In permute mode (see permutation.py) the
    weight is co-permuted so the block sits at `block_range` and is kept merged into the weight.
    """

    adapter_layer_names = ("s2ft_delta",)
    other_param_names = ("s2ft_indices", "s2ft_original_block")

    def __init__(
        self,
        base_layer: nn.Linear,
        adapter_name: str,
        axis: str,
        indices: torch.Tensor,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"S2FT adapts nn.Linear layers only, got {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.axis = axis
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.s2ft_delta = nn.ParameterDict({})
        self.s2ft_indices = BufferDict({}, persistent=True)
        # Permute mode only: the pre-trained values of the block, to present and restore the base.
        self.s2ft_original_block = BufferDict({}, persistent=False)
        self.block_range: tuple[int, int] | None = None
        self.permutation = None  # set by permutation.py when this layer owns a co-permutation
        self._block_synced = False  # permute mode: the block holds original + delta
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, indices, init_weights)

    # ----------------------------------------------------------------------------------------------
    # adapters
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
        limit = self.in_features if self.axis == COLUMNS else self.out_features
        indices = torch.as_tensor(indices, dtype=torch.long).clone()  # own storage, not a slice of one
        if indices.ndim != 1 or len(indices) == 0 or int(indices.min()) < 0 or int(indices.max()) >= limit:
            raise ValueError(
                f"S2FT indices for adapter '{adapter_name}' must be a non-empty 1-D range in [0, {limit})."
            )
        if len(torch.unique(indices)) != len(indices):
            raise ValueError(f"S2FT indices for adapter '{adapter_name}' contain duplicates.")
        shape = self.delta_shape(len(indices))
        # Adapters follow the base weight's dtype; PEFT upcasts half precision later unless told not to.
        delta = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        if not init_weights:
            delta.normal_(std=0.1)
        self.s2ft_delta[adapter_name] = nn.Parameter(delta)
        self.s2ft_indices[adapter_name] = indices.to(weight.device)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def resize_adapter(self, adapter_name: str, indices: torch.Tensor) -> None:
        """Give an adapter another selection (loading a file whose indices differ from the config's)."""
        param = self.s2ft_delta[adapter_name]
        shape = self.delta_shape(len(indices))
        self.s2ft_delta[adapter_name] = nn.Parameter(
            torch.zeros(shape, dtype=param.dtype, device=param.device), requires_grad=param.requires_grad
        )
        self.s2ft_indices[adapter_name] = torch.as_tensor(
            indices, dtype=torch.long, device=self.get_base_layer().weight.device
        )

    def _dim(self) -> int:
        return 1 if self.axis == COLUMNS else 0

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense (out, in) delta against the ORIGINAL base weight (also in permute mode), for export."""
        weight = self.get_base_layer().weight
        delta = self.s2ft_delta[adapter_name].detach().to(weight.dtype)
        dense = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
        return dense.index_copy_(self._dim(), self.s2ft_indices[adapter_name].to(weight.device), delta)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # A delta on |S| columns (rows) has rank <= |S|: a LoRA of that rank reproduces it exactly.
        return True

    def current_indices(self, adapter_name: str) -> torch.Tensor:
        """Indices in the weight as it is stored now (original, or co-permuted in permute mode)."""
        if self.block_range is None:
            return self.s2ft_indices[adapter_name]
        start, stop = self.block_range
        return torch.arange(start, stop, device=self.s2ft_indices[adapter_name].device)

    # ----------------------------------------------------------------------------------------------
    # merging (PEFT contract)
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.s2ft_delta:
                continue
            if self.block_range is not None:
                self.restore_block()  # the block is merged from W0, whatever training left in it
            delta = self.s2ft_delta[name].detach().to(weight.dtype)
            index = self.current_indices(name).to(weight.device)
            if safe_merge:
                merged = weight.data.clone().index_add_(self._dim(), index, delta)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                weight.data.copy_(merged)
            else:
                weight.data.index_add_(self._dim(), index, delta)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.s2ft_delta:
                delta = self.s2ft_delta[name].detach().to(weight.dtype)
                weight.data.index_add_(self._dim(), self.current_indices(name).to(weight.device), -delta)
        if self.block_range is not None:
            self.restore_block()

    # ----------------------------------------------------------------------------------------------
    # permute mode: the block lives merged in the weight
    def restore_block(self) -> None:
        """Put the pre-trained values back into the block (permute mode)."""
        (name,) = self.s2ft_original_block.keys()
        start, stop = self.block_range
        self.get_base_layer().weight.data.narrow(self._dim(), start, stop - start).copy_(self.s2ft_original_block[name])
        self._block_synced = False

    def _sync_block(self, name: str) -> None:
        """Write original + delta into the block.

        Done on every forward: optimizers' foreach kernels do not bump a parameter's version counter, so
        there is no reliable way to tell whether the delta moved. The copy is |block| elements, tiny next
        to the matmul that follows.
        """
        start, stop = self.block_range
        block = self.get_base_layer().weight.data.narrow(self._dim(), start, stop - start)
        torch.add(self.s2ft_original_block[name], self.s2ft_delta[name].detach().to(block.dtype), out=block)
        self._block_synced = True

    # ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            if self.block_range is not None and self._block_synced:
                self.restore_block()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.s2ft_delta]
        if not active:
            if self.block_range is not None and self._block_synced:
                self.restore_block()
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        if self.block_range is not None:
            (name,) = active
            self._sync_block(name)
            start, stop = self.block_range
            return MergedBlockLinear.apply(x, base.weight, base.bias, start, stop, self.axis, self.s2ft_delta[name])
        indices = tuple(self.s2ft_indices[name] for name in active)
        axes = (self.axis,) * len(active)
        return SparseDeltaLinear.apply(
            x, base.weight, base.bias, indices, axes, *(self.s2ft_delta[name] for name in active)
        )

    def __repr__(self) -> str:
        return "s2ft." + super().__repr__()

    def extra_repr(self) -> str:
        return f"axis={'columns' if self.axis == COLUMNS else 'rows'}"


__all__ = ["S2FTLayer", "COLUMNS", "ROWS"]
