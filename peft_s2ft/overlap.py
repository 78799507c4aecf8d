"""Which units (heads, channels, expert channels) adapters select, and how much two selections share.

An adapter is named either by its name on the model or by the folder / hub id of a saved S2FT adapter (whose
indices are read and checked like any load), so a new adapter can avoid one that was trained elsewhere. The paper
fuses adapters best when their selections do not overlap (`S2FTConfig.disjoint_from`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import DOWN, OUTPUT, UP, VALUE, Block, ModelStructure, describe
from .layer import S2FTTunerLayer

# module path -> indices (original coordinates): [k] for a linear layer, [E, k] for fused experts
Indices = dict[str, torch.Tensor]


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel or an S2FTModel (or the model itself)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        model = model.base_model
    return model.model if isinstance(model, BaseTuner) else model


def adapter_indices(model: nn.Module, adapter: str) -> Indices:
    """The indices of `adapter`: an adapter on `model` (the transformers model), or a saved S2FT adapter."""
    found = {
        path: module.selected(adapter)
        for path, module in model.named_modules()
        if isinstance(module, S2FTTunerLayer) and adapter in module.s2ft_delta
    }
    if found:
        return found
    return _saved_adapter_indices(model, adapter)


def _saved_adapter_indices(model: nn.Module, source: str) -> Indices:
    from .checkpoint import AdapterMismatchError, AdapterSource, check_checkpoint, check_geometry
    from .config import S2FTConfig

    names = sorted({n for m in model.modules() if isinstance(m, S2FTTunerLayer) for n in m.s2ft_delta})
    try:
        config = S2FTConfig.from_pretrained(source)
        state_dict = AdapterSource(source).read()
    except (OSError, ValueError) as error:
        on_model = f"the model's adapters are {', '.join(names)}" if names else "the model holds no S2FT adapter"
        raise ValueError(
            f"'{source}' is neither an S2FT adapter on this model ({on_model}) nor a saved S2FT adapter that can be "
            f"read ({error})."
        ) from error
    if state_dict is None:
        raise AdapterMismatchError(f"'{source}' holds an S2FT config but no adapter weights file to read indices from.")
    check_geometry(config, describe(model))
    return {path: indices for path, (_, indices) in check_checkpoint(model, state_dict).items()}


@dataclass
class Units:
    """Selected units per block key: query heads of attention blocks, channels of FFNs, and for fused experts a
    [E, I] mask of (expert, channel) pairs."""

    blocks: dict[str, set[int]] = field(default_factory=dict)
    experts: dict[str, torch.Tensor] = field(default_factory=dict)

    def with_whole_kv_groups(self, structure: ModelStructure) -> Units:
        """The units an adapter that trains value rows must avoid: every head of a K/V group that holds a taken
        head (its value rows feed them all)."""
        widened = Units({k: set(v) for k, v in self.blocks.items()}, dict(self.experts))
        for block in structure.attention:
            heads = widened.blocks.get(block.key)
            if heads:
                size = block.group_size
                widened.blocks[block.key] = {g * size + i for g in {h // size for h in heads} for i in range(size)}
        return widened

    def add(self, other: Units) -> None:
        for key, units in other.blocks.items():
            self.blocks.setdefault(key, set()).update(units)
        for key, mask in other.experts.items():
            self.experts[key] = self.experts[key] | mask if key in self.experts else mask.clone()


def _units_at(span, count: int, indices: torch.Tensor) -> set[int]:
    positions = span.positions(torch.arange(count)).reshape(count, span.width)
    return set(torch.isin(positions, indices).any(dim=1).nonzero().flatten().tolist())


def _block_units(block: Block, indices: Indices) -> set[int]:
    """The heads (a K/V group trained by its value rows counts with all its heads) or channels of `block`."""
    units: set[int] = set()
    for role, span in block.trained.items():
        if span.path not in indices:
            continue
        if role == VALUE:
            groups = _units_at(span, block.num_groups, indices[span.path])
            units |= {g * block.group_size + i for g in groups for i in range(block.group_size)}
        elif role in (OUTPUT, DOWN, UP):
            units |= _units_at(span, block.num_units, indices[span.path])
    return units


def selected_units(structure: ModelStructure, indices: Indices) -> Units:
    units = Units()
    for block in structure.blocks:
        found = _block_units(block, indices)
        if found:
            units.blocks[block.key] = found
    for block in structure.experts:
        if block.key in indices:
            mask = torch.zeros(block.num_experts, block.num_channels, dtype=torch.bool)
            mask.scatter_(1, indices[block.key].long(), True)
            units.experts[block.key] = mask
    return units


def units_of(model: nn.Module, adapters, structure: ModelStructure | None = None) -> Units:
    """The union of the units the given adapters (names on the model or saved adapters) select."""
    structure = structure or describe(model)
    units = Units()
    for adapter in adapters:
        units.add(selected_units(structure, adapter_indices(model, adapter)))
    return units


def selection_overlap(model: nn.Module, adapter_a: str, adapter_b: str) -> dict:
    """How much two adapters' selections share, in units (heads, channels, expert channels).

    Returns totals (`units_a`, `units_b`, `shared`, `fraction_of_a`, `fraction_of_b`, `jaccard`) and `per_block`:
    block key -> {"a", "b", "shared"} unit counts. Adapters are names on the model or saved S2FT adapters.
    """
    model = transformers_model(model)
    structure = describe(model)
    a, b = (selected_units(structure, adapter_indices(model, name)) for name in (adapter_a, adapter_b))
    per_block = {}
    for key in sorted(a.blocks.keys() | b.blocks.keys()):
        ua, ub = a.blocks.get(key, set()), b.blocks.get(key, set())
        per_block[key] = {"a": len(ua), "b": len(ub), "shared": len(ua & ub)}
    for key in sorted(a.experts.keys() | b.experts.keys()):
        ma, mb = a.experts.get(key), b.experts.get(key)
        shared = int((ma & mb).sum()) if ma is not None and mb is not None else 0
        per_block[key] = {
            "a": 0 if ma is None else int(ma.sum()),
            "b": 0 if mb is None else int(mb.sum()),
            "shared": shared,
        }
    total_a = sum(v["a"] for v in per_block.values())
    total_b = sum(v["b"] for v in per_block.values())
    shared = sum(v["shared"] for v in per_block.values())
    union = total_a + total_b - shared
    return {
        "units_a": total_a,
        "units_b": total_b,
        "shared": shared,
        "fraction_of_a": shared / total_a if total_a else 0.0,
        "fraction_of_b": shared / total_b if total_b else 0.0,
        "jaccard": shared / union if union else 0.0,
        "per_block": per_block,
    }


__all__ = ["Units", "adapter_indices", "selected_units", "selection_overlap", "transformers_model", "units_of"]
