"""Permute mode: physically co-permute each block so the trained units form one contiguous block.

Attention: query heads (Q rows, O columns) and K/V groups (K, V rows) are reordered together so every
query head keeps its own K/V group; FFN: channels (gate/up rows, down columns). The block's function is
unchanged. State-dict hooks on the permuted linears keep presenting the ORIGINAL order and pre-trained
values, so `get_base_model_state_dict` / `set_base_model_state_dict` behave as if nothing moved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from .layer import S2FTLayer
from .partial_backprop import COLUMNS
from .structures import discover_structure


def base_linear(module: nn.Module) -> nn.Linear:
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def _expand(units: torch.Tensor, width: int) -> torch.Tensor:
    return (units[:, None] * width + torch.arange(width)).reshape(-1)


def head_order(heads: list[int], num_heads: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query-head order, K/V-group order) that puts `heads` first while keeping every head in its group."""
    selected = set(heads)
    groups = range(num_heads // group_size)
    members = {g: [g * group_size + i for i in range(group_size)] for g in groups}
    count = {g: sum(h in selected for h in members[g]) for g in groups}
    partial = [g for g in groups if 0 < count[g] < group_size]
    if len(partial) > 1:
        raise ValueError(
            f"Heads {sorted(heads)} touch {len(partial)} partly selected K/V groups (group size {group_size}); "
            "permute=True can make them contiguous only with at most one. Use permute=False for this selection."
        )
    group_order = [g for g in groups if count[g] == group_size] + partial
    group_order += [g for g in groups if count[g] == 0]
    query = [h for g in group_order for h in sorted(members[g], key=lambda h: h not in selected)]
    return torch.tensor(query), torch.tensor(group_order)


@dataclass
class _Permuted:
    """One linear whose weight is stored permuted along `dim` (0 = rows, 1 = columns)."""

    linear: nn.Linear
    dim: int
    order: torch.Tensor  # stored[i] = original[order[i]]
    owner: S2FTLayer | None  # the S2FT layer training a block of it, if any
    handles: list = field(default_factory=list)

    def permute(self, inverse: bool = False) -> None:
        order = torch.argsort(self.order) if inverse else self.order
        weight = self.linear.weight.data
        weight.copy_(weight.index_select(self.dim, order.to(weight.device)))
        if self.dim == 0 and self.linear.bias is not None:
            bias = self.linear.bias.data
            bias.copy_(bias.index_select(0, order.to(bias.device)))

    def present_original(self, module, state_dict, prefix, local_metadata) -> None:
        inverse = torch.argsort(self.order)
        weight_key = prefix + "weight"
        if weight_key in state_dict:
            weight = state_dict[weight_key]
            if self.owner is not None and not self.owner.merged:
                start, stop = self.owner.block_range
                weight = weight.clone()
                (original,) = self.owner.s2ft_original_block.values()
                weight.narrow(self.dim, start, stop - start).copy_(original)
            state_dict[weight_key] = weight.index_select(self.dim, inverse.to(weight.device))
        if self.dim == 0 and state_dict.get(prefix + "bias") is not None:
            bias = state_dict[prefix + "bias"]
            state_dict[prefix + "bias"] = bias.index_select(0, inverse.to(bias.device))

    def accept_original(self, module, state_dict, prefix, *args) -> None:
        weight_key = prefix + "weight"
        if weight_key in state_dict:
            weight = state_dict[weight_key].index_select(self.dim, self.order.to(state_dict[weight_key].device))
            if self.owner is not None:
                start, stop = self.owner.block_range
                (name,) = self.owner.s2ft_original_block.keys()
                self.owner.s2ft_original_block[name] = weight.narrow(self.dim, start, stop - start).clone()
                self.owner._block_synced = False
            state_dict[weight_key] = weight
        if self.dim == 0 and state_dict.get(prefix + "bias") is not None:
            bias = state_dict[prefix + "bias"]
            state_dict[prefix + "bias"] = bias.index_select(0, self.order.to(bias.device))

    def install(self) -> None:
        self.permute()
        self.handles = [
            # torch tags hook objects with attributes, which bound methods refuse: wrap them in partials.
            self.linear.register_state_dict_post_hook(partial(_Permuted.present_original, self)),
            self.linear.register_load_state_dict_pre_hook(partial(_Permuted.accept_original, self)),
        ]

    def uninstall(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.permute(inverse=True)


def _align(delta: torch.Tensor, old: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
    position = {int(v): i for i, v in enumerate(old.tolist())}
    return delta.index_select(dim, torch.tensor([position[int(v)] for v in new.tolist()], device=delta.device))


def _enter_block(layer: S2FTLayer, adapter_name: str, order: torch.Tensor) -> None:
    """Turn an index-mode layer into a merged block at the front of its co-permuted weight."""
    old = layer.s2ft_indices[adapter_name]
    count = len(old)
    new = order[:count].to(old.device)
    if set(new.tolist()) != set(old.tolist()):
        raise RuntimeError("internal error: the co-permutation does not bring the selected units to the front")
    dim = 1 if layer.axis == COLUMNS else 0
    delta = layer.s2ft_delta[adapter_name]
    with torch.no_grad():
        delta.data = _align(delta.data, old, new, dim)
    layer.s2ft_indices[adapter_name] = new
    layer.block_range = (0, count)
    weight = layer.get_base_layer().weight.data
    layer.s2ft_original_block[adapter_name] = weight.narrow(dim, 0, count).clone()
    layer._block_synced = False


def permute_model(model: nn.Module, adapter_name: str) -> None:
    """Co-permute every block in which `adapter_name` trains something (after its layers were attached)."""
    structure = discover_structure(model)
    for block in structure.attention:
        o_layer = model.get_submodule(block.module("o_proj"))
        if not isinstance(o_layer, S2FTLayer) or adapter_name not in o_layer.s2ft_indices:
            continue
        columns = o_layer.s2ft_indices[adapter_name].cpu()
        heads = sorted(set((columns // block.head_dim).tolist()))
        query, groups = head_order(heads, block.num_heads, block.group_size)
        query_rows, group_rows = _expand(query, block.head_dim), _expand(groups, block.head_dim)
        v_module = model.get_submodule(block.module("v_proj"))
        v_layer = v_module if isinstance(v_module, S2FTLayer) and adapter_name in v_module.s2ft_indices else None
        _install(
            o_layer,
            [
                (block.module("q_proj"), 0, query_rows, None),
                (block.module("k_proj"), 0, group_rows, None),
                (block.module("v_proj"), 0, group_rows, v_layer),
                (block.module("o_proj"), 1, query_rows, o_layer),
            ],
            model,
            adapter_name,
        )
    for block in structure.ffn:
        down_layer = model.get_submodule(block.module("down_proj"))
        if not isinstance(down_layer, S2FTLayer) or adapter_name not in down_layer.s2ft_indices:
            continue
        channels = down_layer.s2ft_indices[adapter_name].cpu()
        order = torch.tensor(sorted(range(block.num_channels), key=lambda c: c not in set(channels.tolist())))
        up_module = model.get_submodule(block.module("up_proj"))
        up_layer = up_module if isinstance(up_module, S2FTLayer) and adapter_name in up_module.s2ft_indices else None
        _install(
            down_layer,
            [
                (block.module("gate_proj"), 0, order, None),
                (block.module("up_proj"), 0, order, up_layer),
                (block.module("down_proj"), 1, order, down_layer),
            ],
            model,
            adapter_name,
        )


def _install(owner: S2FTLayer, members, model: nn.Module, adapter_name: str) -> None:
    permuted = []
    for key, dim, order, trained_layer in members:
        entry = _Permuted(base_linear(model.get_submodule(key)), dim, order, trained_layer)
        entry.install()
        if trained_layer is not None:
            _enter_block(trained_layer, adapter_name, order)
        permuted.append(entry)
    owner.permutation = permuted


def unpermute_model(model: nn.Module) -> None:
    """Undo every co-permutation: original order, pre-trained values (unless merged), index-mode layers."""
    layers = [m for m in model.modules() if isinstance(m, S2FTLayer)]
    for layer in layers:
        if layer.block_range is not None and not layer.merged and layer.s2ft_original_block:
            layer.restore_block()
    for layer in layers:
        for entry in layer.permutation or []:
            entry.uninstall()
        layer.permutation = None
    for layer in layers:
        layer.block_range = None
        layer._block_synced = False
        for name in list(layer.s2ft_original_block.keys()):
            del layer.s2ft_original_block[name]
