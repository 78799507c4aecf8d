"""Which heads and channels each layer trains: a scoring strategy plus a budget allocation.

Selection runs on its own seeded generator, so it never touches torch's global random state and a
reload with another global seed selects the same units.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .architectures import DOWN, OUTPUT, Block, ExpertsBlock
from .calibration import CalibrationScores, needs_calibration
from .config import S2FTConfig
from .linear_like import weight_values
from .overlap import Units
from .partitioned import full_numel, full_shape


@dataclass(frozen=True)
class Selection:
    """Units picked per block: head indices (attention) or channel indices (FFN), keyed by block key."""

    heads: dict[str, list[int]]
    channels: dict[str, list[int]]
    expert_channels: dict[str, torch.Tensor] = field(default_factory=dict)  # experts key -> [E, k] channels


def count_parameters(model: nn.Module) -> int:
    """Parameters of the base model, counting tied weights once and no adapter's own (PEFT layers' adapter tensors,
    modules_to_save copies), so an adapter added to a model that already holds others gets the same budget."""
    adapters: set[int] = set()
    for module in model.modules():
        containers = [getattr(module, name, None) for name in getattr(module, "adapter_layer_names", ())]
        if isinstance(module, AuxiliaryTrainingWrapper):
            containers.append(getattr(module, "modules_to_save", None))
        for container in containers:
            if isinstance(container, nn.Module):
                adapters |= {id(p) for p in container.parameters()}
    unique = {id(p): p for p in model.parameters() if id(p) not in adapters}
    return sum(logical_numel(p) for p in unique.values())


def logical_numel(param: torch.Tensor) -> int:
    """The number of weights a parameter stands for: a bitsandbytes 4-bit parameter packs two per byte of its
    storage (its quantization state has the layer's shape), and a ZeRO-3 partitioned one is an empty placeholder
    (partitioned.py knows its full size); otherwise its numel()."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else full_numel(param)


def _unit_scores(
    strategy: str,
    generator: torch.Generator,
    block: Block,
    output_weight: torch.Tensor | None,
    calibration: CalibrationScores | None,
) -> torch.Tensor:
    if strategy == "random":
        return torch.rand(block.num_units, generator=generator)
    assert output_weight is not None
    if calibration is not None:
        return calibration.unit_scores(strategy, block, output_weight)
    norms = _unit_norms(output_weight, block)
    return norms if strategy == "weight_large" else -norms


def _unit_norms(output_weight: torch.Tensor, block: Block) -> torch.Tensor:
    """Norm of each unit's input columns of the output (O / down) projection, given as (out, in)."""
    span = block.trained[OUTPUT if block.kind == "attention" else DOWN]
    output_weight = weight_values(output_weight)
    columns = span.positions(torch.arange(block.num_units)).to(output_weight.device)
    picked = output_weight.detach().float().index_select(1, columns)
    return picked.reshape(output_weight.shape[0], block.num_units, span.width).norm(dim=(0, 2)).cpu()


def _count(
    field_count: int | None,
    field_ratio: float | None,
    budget_params: float,
    params_per_unit: float,
    units_per_block: int,
    num_blocks: int,
    allocation: str,
    count_field: str,
    unit_name: str,
    total_units: int,
) -> int:
    """Units per block (uniform; at most the smallest block's) or in total (global)."""
    scale = 1 if allocation == "uniform" else num_blocks
    available = units_per_block if allocation == "uniform" else total_units
    if field_count is not None:
        if field_count > available:
            where = "in the smallest adapted layer" if allocation == "uniform" else f"over {num_blocks} adapted layers"
            raise ValueError(f"S2FTConfig.{count_field}={field_count}, but the model has only {available} {where}.")
        return field_count
    if field_ratio is not None:
        return max(1, round(field_ratio * available))
    if budget_params <= 0:
        return 0
    requested = max(1, round(budget_params / (params_per_unit * (num_blocks / scale))))
    if requested > available:
        warnings.warn(
            f"S2FT: the parameter budget (trainable_ratio) asks for {requested} {unit_name} "
            f"{'per layer' if scale == 1 else 'in total'}, more than the {available} there are (the model's other "
            f"parameters, e.g. a large vocabulary, dominate its size); training all of them. Set {count_field} "
            "to choose explicitly.",
            stacklevel=4,
        )
    return min(available, requested)


def _pick(scores: list[torch.Tensor], counts: list[int], group_sizes: list[int]) -> list[list[int]]:
    """Top-`count` units by score per block; with group_size > 1 whole groups are filled first.

    Filling groups first leaves at most one partly selected K/V group, which is what lets a GQA
    permutation make the selected query heads contiguous while every head keeps its own K/V group.
    """
    picked = []
    for block_scores, count, group_size in zip(scores, counts, group_sizes, strict=True):
        if group_size == 1:
            order = torch.argsort(block_scores, descending=True, stable=True)
        else:
            grouped = block_scores.reshape(-1, group_size)
            group_order = torch.argsort(grouped.max(dim=1).values, descending=True, stable=True)
            within = torch.argsort(grouped, dim=1, descending=True, stable=True)
            order = (group_order[:, None] * group_size + within[group_order]).reshape(-1)
        order = order[block_scores[order] > float("-inf")]  # other adapters' units (disjoint_from), never picked
        picked.append(sorted(order[:count].tolist()))
    return picked


def _global_counts(scores: list[torch.Tensor], total: int) -> list[int]:
    flat = torch.cat(scores)
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(scores)])
    top = torch.argsort(flat, descending=True, stable=True)[:total]
    return torch.bincount(owner[top], minlength=len(scores)).tolist()


def select_units(
    config: S2FTConfig,
    model: nn.Module,
    attention: list[Block],
    ffn: list[Block],
    weights: dict[str, torch.Tensor],
    experts: list[ExpertsBlock] = (),
    taken: Units | None = None,
) -> Selection:
    """Choose heads and channels for the adapted blocks.

    `weights` maps each block's key to its output (O / down) projection's weight as (out, in), which both the
    budget (parameters per unit) and weight-based strategies read; for an experts block, its fused `down_proj`.
    Every expert counts as an FFN of its own: with the uniform allocation each expert trains as many channels as
    each dense FFN. Units in `taken` (other adapters' selections, `S2FTConfig.disjoint_from`) are never chosen.
    """
    taken = taken or Units()
    calibration = _calibration_for(config, model, attention, ffn, experts)
    budget = config.trainable_ratio * count_parameters(model)
    attention_budget = budget * config.attention_share
    heads = _select_kind(
        config,
        attention,
        weights,
        attention_budget,
        config.heads_per_layer,
        config.head_ratio,
        "heads_per_layer",
        0,
        taken,
        calibration,
    )
    channels, expert_channels = _select_ffn(
        config, ffn, experts, weights, budget - attention_budget, taken, calibration
    )
    return Selection(heads, channels, expert_channels)


def _select_ffn(
    config: S2FTConfig,
    ffn: list[Block],
    experts: list[ExpertsBlock],
    weights: dict[str, torch.Tensor],
    budget: float,
    taken: Units,
    calibration: CalibrationScores | None,
) -> tuple[dict[str, list[int]], dict[str, torch.Tensor]]:
    """Dense FFN channels, and the channels of every expert (the same count per expert)."""
    if not experts:
        channels = _select_kind(
            config,
            ffn,
            weights,
            budget,
            config.channels_per_layer,
            config.channel_ratio,
            "channels_per_layer",
            1,
            taken,
            calibration,
        )
        return channels, {}
    if config.allocation != "uniform":
        raise ValueError(
            "S2FTConfig.allocation='global' gives FFNs different channel counts, but a fused experts module trains "
            "the same count in every expert. Use allocation='uniform' on mixture-of-experts models."
        )
    per_unit = [full_shape(weights[b.key])[0] for b in ffn]
    per_unit += [b.hidden_size for b in experts for _ in range(b.num_experts)]
    count = _count(
        config.channels_per_layer,
        config.channel_ratio,
        budget,
        sum(per_unit) / len(per_unit),
        min([b.num_units for b in ffn] + [b.num_channels for b in experts]),
        len(per_unit),
        "uniform",
        "channels_per_layer",
        "channels",
        total_units=0,
    )
    channels = (
        _select_kind(config, ffn, weights, budget, count, None, "channels_per_layer", 1, taken, calibration)
        if ffn
        else {}
    )
    generator = torch.Generator().manual_seed(config.seed + 2)
    expert_channels = {}
    for block in experts:
        if config.selection == "random":
            scores = torch.rand(block.num_experts, block.num_channels, generator=generator)
        else:
            down = weights[block.key].detach().float()  # [E, H, I], or [E, I, H] where stored transposed
            norms = down.norm(dim=2 if block.transposed else 1).cpu()
            scores = norms if config.selection == "weight_large" else -norms
        if block.key in taken.experts:
            mask = taken.experts[block.key]
            _check_free(count, int((~mask).sum(dim=1).min()), f"{block.key} (per expert)", "channels", config)
            scores = scores.masked_fill(mask, float("-inf"))
        top = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :count]
        expert_channels[block.key] = top.sort(dim=1).values
    return channels, expert_channels


def _select_kind(
    config: S2FTConfig,
    blocks: list[Block],
    weights: dict[str, torch.Tensor],
    budget: float,
    count_field_value: int | None,
    ratio: float | None,
    count_field: str,
    seed_offset: int,
    taken: Units,
    calibration: CalibrationScores | None,
) -> dict[str, list[int]]:
    """One kind of unit (heads or channels) over its blocks: how many, then which."""
    if not blocks:
        return {}
    output = OUTPUT if blocks[0].kind == "attention" else DOWN
    params_per_unit = sum(full_shape(weights[b.key])[0] * b.trained[output].width for b in blocks) / len(blocks)
    count = _count(
        count_field_value,
        ratio,
        budget,
        params_per_unit,
        min(b.num_units for b in blocks),
        len(blocks),
        config.allocation,
        count_field,
        blocks[0].unit_name,
        total_units=sum(b.num_units for b in blocks),
    )
    generator = torch.Generator().manual_seed(config.seed + seed_offset)
    scores = [
        _unit_scores(
            config.selection, generator, b, None if config.selection == "random" else weights[b.key], calibration
        )
        for b in blocks
    ]
    scores = [
        _without_taken(b, block_scores, taken, count, config) for b, block_scores in zip(blocks, scores, strict=True)
    ]
    if config.allocation == "global":
        free = sum(b.num_units - len(taken.blocks.get(b.key, ())) for b in blocks)
        _check_free(count, free, f"{len(blocks)} adapted layers", blocks[0].unit_name, config)
    counts = [count] * len(blocks) if config.allocation == "uniform" else _global_counts(scores, count)
    # Permute mode fills whole K/V groups first, so the selected heads can be made contiguous.
    group_sizes = [b.group_size if config.permute else 1 for b in blocks]
    picked = _pick(scores, counts, group_sizes)
    return {b.key: sel for b, sel in zip(blocks, picked, strict=True) if sel}


def _calibration_for(
    config: S2FTConfig, model: nn.Module, attention: list[Block], ffn: list[Block], experts: list[ExpertsBlock]
) -> CalibrationScores | None:
    """The calibration statistics a data-driven strategy reads, checked against the blocks to select in."""
    if not needs_calibration(config.selection):
        return None
    calibration = getattr(config, "_calibration", None)
    if calibration is None:
        raise ValueError(
            f"S2FTConfig.selection='{config.selection}' scores heads and channels on calibration data, and this "
            "config has none: call peft_s2ft.calibrate_selection(model, config, batches) with a few batches of the "
            "fine-tuning data before get_peft_model (a saved adapter keeps its selection: load it with "
            "PeftModel.from_pretrained, which needs no data)."
        )
    if experts:
        raise ValueError(
            f"S2FTConfig.selection='{config.selection}' scores dense heads and channels, not the channels inside "
            f"fused experts ({experts[0].key}): use selection='random' or 'weight_large' / 'weight_small', or leave "
            "the experts out of target_modules."
        )
    calibration.check_covers(attention + ffn, model)
    return calibration


def _without_taken(block: Block, scores: torch.Tensor, taken: Units, count: int, config: S2FTConfig) -> torch.Tensor:
    """Scores with other adapters' units ruled out (they sort last and are never among the chosen)."""
    units = taken.blocks.get(block.key)
    if not units:
        return scores
    if config.allocation == "uniform":
        _check_free(count, block.num_units - len(units), block.key, block.unit_name, config)
    mask = torch.zeros(block.num_units, dtype=torch.bool)
    mask[list(units)] = True
    return scores.masked_fill(mask, float("-inf"))


def _check_free(count: int, free: int, where: str, unit_name: str, config: S2FTConfig) -> None:
    if count > free:
        raise ValueError(
            f"S2FTConfig.disjoint_from={config.disjoint_from} leaves {free} {unit_name} free in {where}, but this "
            f"adapter needs {count}: lower its budget (trainable_ratio, heads_per_layer / channels_per_layer) or "
            "avoid fewer adapters."
        )
