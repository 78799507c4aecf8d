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

from .architectures import DOWN, OUTPUT, UP, VALUE, Block, Span, describe
from .architectures.description import CHANNEL, HEAD, KV_GROUP, OUT, PARAM
from .architectures.discovery import base_layer_of, text_config
from .layer import S2FTLayer
from .linear_like import weight_dim

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
    """Refuse permute mode where the model depends on head order beyond the described tensors (ALiBi slopes)."""
    structure = describe(model)
    config = text_config(model)
    flags = [flag for flag in structure.family.order_sensitive if getattr(config, flag, False)]
    if flags:
        raise ValueError(
            f"S2FTConfig.permute=True physically reorders heads, but this {structure.family.name} model has "
            f"{', '.join(f'{f}=True' for f in flags)}: its per-head position biases depend on the head index, so "
            "reordering heads would change the model. Use permute=False: the default mode trains the same adapter."
        )


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


@dataclass(frozen=True)
class Member:
    """One parameter a block's co-permutation reorders: stored[i] = original[order[i]] along `dim`."""

    module_path: str  # the module holding the parameter, as the model names it (possibly a tuner wrapper)
    name: str
    dim: int
    order: torch.Tensor


def _unit_counts(block: Block) -> dict[str, int]:
    return {HEAD: block.num_units, KV_GROUP: block.num_groups, CHANNEL: block.num_units}


def _units_at(span: Span, count: int, indices: torch.Tensor) -> list[int]:
    """The units that own any of `indices` along the span's axis."""
    positions = span.positions(torch.arange(count)).reshape(count, span.width)
    hit = torch.isin(positions, indices).any(dim=1)
    return hit.nonzero().flatten().tolist()


def _parameters_of(model: nn.Module, span: Span) -> list[tuple[str, nn.Module, str, int]]:
    """(module path, module, parameter name, dim) of every parameter the span's axis indexes."""
    try:
        module = base_layer_of(model.get_submodule(span.path))
    except AttributeError:  # a parameter held directly by a module (attention sinks)
        parent, _, name = span.path.rpartition(".")
        return [(parent, base_layer_of(model.get_submodule(parent)), name, 0)]
    if span.side == PARAM:
        return [(span.path, module, name, 0) for name, _ in module.named_parameters(recurse=False)]
    found = [(span.path, module, "weight", weight_dim(module, span.side))]
    if span.side == OUT and module.bias is not None:
        found.append((span.path, module, "bias", 0))
    return found


def _block_units(block: Block, selected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The unit orders (per unit kind) that put the block's selected units first."""
    counts = _unit_counts(block)
    if block.kind == "attention":
        output, value = block.trained[OUTPUT], block.trained[VALUE]
        if output.path in selected:
            heads = _units_at(output, block.num_units, selected[output.path])
        else:
            groups = _units_at(value, block.num_groups, selected[value.path])
            heads = [g * block.group_size + i for g in groups for i in range(block.group_size)]
        query, groups = head_order(heads, block.num_units, block.group_size)
        return {HEAD: query, KV_GROUP: groups}
    span = next(block.trained[r] for r in (DOWN, UP) if block.trained[r].path in selected)
    chosen = set(_units_at(span, counts[CHANNEL], selected[span.path]))
    return {CHANNEL: torch.tensor(sorted(range(block.num_units), key=lambda c: c not in chosen))}


def member_orders(model: nn.Module, block: Block, unit_orders: dict[str, torch.Tensor]) -> list[Member]:
    """Every parameter of `block` reordered so that unit slot i holds original unit `unit_orders[kind][i]`.

    Several parts of one fused tensor (Q, K and V rows of `qkv_proj`) compose into one order of that tensor.
    """
    counts = _unit_counts(block)
    orders: dict[tuple[str, str], tuple[torch.Tensor, int]] = {}
    for span in block.moved:
        for module_path, module, name, dim in _parameters_of(model, span):
            key = (module_path, name)
            if key not in orders:
                orders[key] = (torch.arange(getattr(module, name).shape[dim]), dim)
            order = orders[key][0]
            order[span.positions(torch.arange(counts[span.unit]))] = span.positions(unit_orders[span.unit])
    return [Member(path, name, dim, order) for (path, name), (order, dim) in orders.items()]


def block_orders(model: nn.Module, structure, selected: dict[str, torch.Tensor]) -> list[tuple[str, list[Member]]]:
    """For every block that `selected` (module path -> trained indices) trains: its owner and its members.

    Pure: it moves nothing, and raises if co-permutation cannot bring every trained module's indices together
    (heads in more than one partly selected K/V group, columns that are not whole heads, value rows outside the
    selected heads' K/V groups, up rows other than the down columns, or a fused layout that interleaves them).
    """
    plans = []
    for block in structure.blocks:
        trained = [span for span in block.trained.values() if span.path in selected]
        if not trained:
            continue
        members = member_orders(model, block, _block_units(block, selected))
        orders = {(m.module_path, m.name): m.order for m in members}
        for span in trained:
            order = orders[(span.path, "weight")]
            stored = torch.argsort(order)[selected[span.path]].sort().values
            leading = span.positions(torch.arange(len(stored) // span.width))  # the block's first units
            contiguous = int(stored[-1]) - int(stored[0]) + 1 == len(stored)
            leads = len(stored) % span.width == 0 and torch.equal(stored, leading.sort().values)
            if leads and not contiguous:
                raise ValueError(
                    f"permute=True cannot make the units trained in '{span.path}' one block: this family's fused "
                    f"layout interleaves them with other rows (one {span.unit.replace('_', ' ')} every {span.outer} "
                    "positions). Select a single unit there, or use the default mode (permute=False), which trains "
                    "any selection."
                )
            if not leads:
                raise ValueError(
                    f"permute=True cannot make the units trained in '{span.path}' contiguous: its indices are not "
                    "whole heads, or value rows outside the selected heads' K/V groups, or up rows other than the down "
                    "columns. The default mode (permute=False) trains such a selection."
                )
        owner = next(span.path for span in trained)
        plans.append((owner, members))
    return plans


def check_contiguous(model: nn.Module, plan: dict[str, tuple[str, torch.Tensor]]) -> None:
    """Refuse, before anything moves, a selection that co-permutation cannot make contiguous."""
    block_orders(model, describe(model), {path: indices for path, (_, indices) in plan.items()})


def reordered(tensor: torch.Tensor, dim: int, order: torch.Tensor) -> torch.Tensor:
    """`tensor.index_select(dim, order)`, also for a DTensor (FSDP2's sharded parameters, and the tensors of their
    state dicts): those are reordered in full and handed back sharded as they came, since a reorder along the
    sharded dimension moves rows between ranks. Every rank must take part, as in any FSDP2 state-dict call."""
    if _is_dtensor(tensor):
        from torch.distributed.tensor import DTensor, Replicate

        mesh, placements = tensor.device_mesh, tensor.placements
        full = tensor.full_tensor().index_select(dim, order.to(tensor.device))
        replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
        return replicated.redistribute(mesh, placements)  # Replicate -> Shard keeps the local chunk: no traffic
    return tensor.index_select(dim, order.to(tensor.device))


def _is_dtensor(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


@dataclass
class _Permuted:
    """One parameter stored permuted along `dim`; state-dict hooks present and accept it in original order."""

    module: nn.Module  # holds the parameter
    name: str
    dim: int
    order: torch.Tensor  # stored[i] = original[order[i]]
    parent: nn.Module  # the module holding `module` (or the S2FT layer wrapping it) as attribute `child`
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

    def _reorder(self, state: dict, prefix: str, order: torch.Tensor) -> None:
        key = prefix + self.name
        if state.get(key) is not None:
            state[key] = reordered(state[key], self.dim, order)

    def present_original(self, module, state_dict, prefix, local_metadata) -> None:
        if not _stored_order.get():
            self._reorder(state_dict, prefix, self.inverse)

    def accept_original(self, module, state_dict, prefix, *args) -> None:
        self._reorder(state_dict, prefix, self.order)

    def _permute_in_place(self, order: torch.Tensor) -> None:
        with torch.no_grad():
            tensor = getattr(self.module, self.name)
            tensor.copy_(tensor.index_select(self.dim, order.to(tensor.device)))

    def install(self) -> None:
        self._permute_in_place(self.order)
        self.handles = [
            # torch tags hook objects with attributes, which bound methods refuse: wrap them in partials.
            self.module.register_state_dict_post_hook(partial(_Permuted.present_original, self)),
            self.module.register_load_state_dict_pre_hook(partial(_Permuted.accept_original, self)),
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
    """Turn an index-mode layer into a block at its contiguous range of the co-permuted weight."""
    old = layer.selected(adapter_name)
    stored = torch.argsort(order)[old]
    start, count = int(stored.min()), len(old)
    new = order[start : start + count]  # the same set as `old`, in stored order: block_orders checked it
    with torch.no_grad():
        delta = layer.s2ft_delta[adapter_name]
        delta.data = align(delta.data, old, new, layer.dim)
    layer._set_indices(adapter_name, new)
    layer.block_range = (start, start + count)


def permute_model(model: nn.Module, adapter_name: str) -> None:
    """Co-permute every block in which `adapter_name` trains something (after its layers were attached).

    All orders are computed and checked before the first weight moves, and each permuted parameter is recorded on
    its block's owner as soon as it moves, so `unpermute_model` can always undo what was done.
    """
    check_permutable(model)
    trained = {
        path: module
        for path, module in model.named_modules()
        if isinstance(module, S2FTLayer) and adapter_name in module.s2ft_indices
    }
    selected = {path: layer.selected(adapter_name) for path, layer in trained.items()}
    for owner_path, members in block_orders(model, describe(model), selected):
        owner = trained[owner_path]
        owner.permutation = []
        for member in members:
            parent_path, _, child = member.module_path.rpartition(".")
            entry = _Permuted(
                base_layer_of(model.get_submodule(member.module_path)),
                member.name,
                member.dim,
                member.order,
                model.get_submodule(parent_path),
                child,
            )
            entry.install()
            owner.permutation.append(entry)
            if member.module_path in trained and member.name == "weight":
                _enter_block(trained[member.module_path], adapter_name, member.order)


def unpermute_model(model: nn.Module) -> None:
    """Undo every co-permutation: original order, index-mode layers. Merged blocks move with their columns."""
    layers = [m for m in model.modules() if isinstance(m, S2FTLayer)]
    for layer in layers:
        for entry in layer.permutation or []:
            entry.uninstall()
        layer.permutation = None
    for layer in layers:
        layer.block_range = None
