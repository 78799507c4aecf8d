"""Permute mode: physically co-permute each block once, so the trained units form one contiguous block.

Attention: query heads (Q rows, O columns) and K/V groups (K, V rows) are reordered together so every
query head keeps its own K/V group; FFN: channels (gate/up rows, down columns). The block's function is
unchanged. The S2FT layers then read their input columns as a contiguous slice instead of a gather; nothing
writes the weights again until the permutation is undone. State-dict hooks on the permuted linears keep
presenting the ORIGINAL order, so `get_base_model_state_dict` / `set_base_model_state_dict` behave as if
nothing moved.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from .layer import S2FTLayer
from .structures import base_layer_of, discover_structure

# Model types whose coupled structures are fully known: every tensor that depends on a head's or a channel's
# position is permuted below (Q/K/V rows with biases, O columns, gate/up rows with biases, down columns), and
# nothing else (q/k norms over one head's width, rotary embeddings, sliding windows) depends on the order.
# Other families may hold per-head tensors elsewhere (OLMo2's q/k norms over the whole projection, Cohere's
# per-head norms, ALiBi slopes), which a permutation would silently break.
PERMUTE_SAFE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_stored_order = contextvars.ContextVar("s2ft_state_dict_in_stored_order", default=False)


@contextlib.contextmanager
def state_dict_in_stored_order() -> Iterator[None]:
    """Within this context, permuted weights appear in the state dict as stored (no copy, permuted order).

    For callers that only keep the adapter's own tensors (saving an adapter): un-permuting every base weight
    would allocate a copy of most of the model for nothing.
    """
    token = _stored_order.set(True)
    try:
        yield
    finally:
        _stored_order.reset(token)


def check_permutable(model: nn.Module) -> None:
    """Refuse permute mode on a model whose per-head and per-channel tensors are not all known."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in PERMUTE_SAFE_MODEL_TYPES:
        raise ValueError(
            f"S2FTConfig.permute=True physically reorders heads and channels, which preserves the model's function "
            f"only if every tensor that depends on a head's position moves with it. peft_s2ft knows all of them for "
            f"model types {', '.join(PERMUTE_SAFE_MODEL_TYPES)}, not for '{model_type}' (it may have per-head norms, "
            "sinks or position biases elsewhere). Use permute=False: the default mode trains the same adapter."
        )


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


def _block_heads(block, o_columns: torch.Tensor | None, v_rows: torch.Tensor | None) -> list[int]:
    """The query heads a block trains: from its O columns, or whole K/V groups when only V rows train."""
    if o_columns is not None:
        return sorted(set((o_columns // block.head_dim).tolist()))
    groups = sorted(set((v_rows // block.head_dim).tolist()))
    return [g * block.group_size + i for g in groups for i in range(block.group_size)]


# (module path, weight dimension, order): the permutation of one member of a block
Member = tuple[str, int, torch.Tensor]


def block_orders(structure, selected: dict[str, torch.Tensor]) -> list[tuple[str, list[Member]]]:
    """For every block that `selected` (module path -> trained indices) trains: its owner and members' orders.

    Pure: it moves nothing, and raises if co-permutation cannot bring every trained module's indices to the front
    of its block (heads in more than one partly selected K/V group, O columns that are not whole heads, V rows
    outside the selected heads' groups, up rows other than the down columns).
    """
    plans = []
    for block in structure.attention:
        o_path, v_path = block.module("o_proj"), block.module("v_proj")
        if o_path not in selected and v_path not in selected:
            continue
        heads = _block_heads(block, selected.get(o_path), selected.get(v_path))
        query, groups = head_order(heads, block.num_heads, block.group_size)
        query_rows, group_rows = _expand(query, block.head_dim), _expand(groups, block.head_dim)
        members = [
            (block.module("q_proj"), 0, query_rows),
            (block.module("k_proj"), 0, group_rows),
            (v_path, 0, group_rows),
            (o_path, 1, query_rows),
        ]
        plans.append((o_path if o_path in selected else v_path, members))
    for block in structure.ffn:
        down_path, up_path = block.module("down_proj"), block.module("up_proj")
        if down_path not in selected and up_path not in selected:
            continue
        chosen = set(selected.get(down_path, selected.get(up_path)).tolist())
        order = torch.tensor(sorted(range(block.num_channels), key=lambda c: c not in chosen))
        members = [(block.module("gate_proj"), 0, order), (up_path, 0, order), (down_path, 1, order)]
        plans.append((down_path if down_path in selected else up_path, members))
    for _, members in plans:
        for path, _, order in members:
            if path in selected and set(order[: len(selected[path])].tolist()) != set(selected[path].tolist()):
                raise ValueError(
                    f"permute=True cannot make the units trained in '{path}' contiguous: its indices are not whole "
                    "heads, or value rows outside the selected heads' K/V groups, or up rows other than the down "
                    "columns. The default mode (permute=False) trains such a selection."
                )
    return plans


def check_contiguous(model: nn.Module, plan: dict[str, tuple[str, torch.Tensor]]) -> None:
    """Refuse, before anything moves, a selection that co-permutation cannot make contiguous."""
    block_orders(discover_structure(model), {path: indices for path, (_, indices) in plan.items()})


@dataclass
class _Permuted:
    """One linear whose weight is stored permuted along `dim` (0 = rows, 1 = columns)."""

    linear: nn.Linear
    dim: int
    order: torch.Tensor  # stored[i] = original[order[i]]
    parent: nn.Module  # the module holding it (or the S2FT layer wrapping it) as attribute `child`
    child: str
    inverse: torch.Tensor = field(init=False)
    handles: list = field(default_factory=list)
    holder: nn.Module = field(init=False)  # what `parent.<child>` was when it was permuted

    def __post_init__(self) -> None:
        self.inverse = torch.argsort(self.order)
        self.holder = getattr(self.parent, self.child)

    def still_in_place(self) -> bool:
        """False once another method has wrapped this module: it would see the permuted weight as original."""
        return getattr(self.parent, self.child) is self.holder

    def _reorder(self, module: nn.Module, state: dict, prefix: str, order: torch.Tensor) -> None:
        for name, dim in (("weight", self.dim), ("bias", 0)):
            key = prefix + name
            if state.get(key) is not None and (name == "weight" or self.dim == 0):
                state[key] = state[key].index_select(dim, order.to(state[key].device))

    def present_original(self, module, state_dict, prefix, local_metadata) -> None:
        if not _stored_order.get():
            self._reorder(module, state_dict, prefix, self.inverse)

    def accept_original(self, module, state_dict, prefix, *args) -> None:
        self._reorder(module, state_dict, prefix, self.order)

    def _permute_in_place(self, order: torch.Tensor) -> None:
        with torch.no_grad():
            weight = self.linear.weight
            weight.copy_(weight.index_select(self.dim, order.to(weight.device)))
            if self.dim == 0 and self.linear.bias is not None:
                bias = self.linear.bias
                bias.copy_(bias.index_select(0, order.to(bias.device)))

    def install(self) -> None:
        self._permute_in_place(self.order)
        self.handles = [
            # torch tags hook objects with attributes, which bound methods refuse: wrap them in partials.
            self.linear.register_state_dict_post_hook(partial(_Permuted.present_original, self)),
            self.linear.register_load_state_dict_pre_hook(partial(_Permuted.accept_original, self)),
        ]

    def uninstall(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self._permute_in_place(self.inverse)


def align(delta: torch.Tensor, old: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
    """`delta`'s slices along `dim` reordered from index order `old` to `new` (the same set of indices)."""
    position = {int(v): i for i, v in enumerate(old.tolist())}
    return delta.index_select(dim, torch.tensor([position[int(v)] for v in new.tolist()], device=delta.device))


def _enter_block(layer: S2FTLayer, adapter_name: str, order: torch.Tensor) -> None:
    """Turn an index-mode layer into a block at the front of its co-permuted weight."""
    old = layer.selected(adapter_name)
    count = len(old)
    new = order[:count]  # the same set as `old`: block_orders checked it
    with torch.no_grad():
        delta = layer.s2ft_delta[adapter_name]
        delta.data = align(delta.data, old, new, layer.dim)
    layer._set_indices(adapter_name, new)
    layer.block_range = (0, count)


def permute_model(model: nn.Module, adapter_name: str) -> None:
    """Co-permute every block in which `adapter_name` trains something (after its layers were attached).

    All orders are computed and checked before the first weight moves, and each permuted linear is recorded on its
    block's owner as soon as it moves, so `unpermute_model` can always undo what was done.
    """
    check_permutable(model)
    trained = {
        path: module
        for path, module in model.named_modules()
        if isinstance(module, S2FTLayer) and adapter_name in module.s2ft_indices
    }
    selected = {path: layer.selected(adapter_name) for path, layer in trained.items()}
    for owner_path, members in block_orders(discover_structure(model), selected):
        owner = trained[owner_path]
        owner.permutation = []
        for path, dim, order in members:
            parent_path, _, child = path.rpartition(".")
            entry = _Permuted(
                base_layer_of(model.get_submodule(path)), dim, order, model.get_submodule(parent_path), child
            )
            entry.install()
            owner.permutation.append(entry)
            if path in trained:
                _enter_block(trained[path], adapter_name, order)


def unpermute_model(model: nn.Module) -> None:
    """Undo every co-permutation: original order, index-mode layers. Merged blocks move with their columns."""
    layers = [m for m in model.modules() if isinstance(m, S2FTLayer)]
    for layer in layers:
        for entry in layer.permutation or []:
            entry.uninstall()
        layer.permutation = None
    for layer in layers:
        layer.block_range = None
