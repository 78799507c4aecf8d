"""Which heads and channels each layer trains: a scoring strategy plus a budget allocation.

Selection runs on its own seeded generator, so it never touches torch's global random state and a
reload with another global seed selects the same units.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .config import S2FTConfig
from .structures import AttentionBlock, FFNBlock


@dataclass(frozen=True)
class Selection:
    """Units picked per block: head indices (attention) or channel indices (FFN), keyed by block prefix."""

    heads: dict[str, list[int]]
    channels: dict[str, list[int]]


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model, counting tied weights once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _unit_scores(
    strategy: str, generator: torch.Generator, num_units: int, weight_columns_norm: torch.Tensor | None
) -> torch.Tensor:
    if strategy == "random":
        return torch.rand(num_units, generator=generator)
    assert weight_columns_norm is not None
    return weight_columns_norm if strategy == "weight_large" else -weight_columns_norm


def _head_norms(o_proj_weight: torch.Tensor, block: AttentionBlock) -> torch.Tensor:
    columns = o_proj_weight.detach().float().reshape(o_proj_weight.shape[0], block.num_heads, block.head_dim)
    return columns.norm(dim=(0, 2)).cpu()


def _channel_norms(down_proj_weight: torch.Tensor) -> torch.Tensor:
    return down_proj_weight.detach().float().norm(dim=0).cpu()


def _count(
    field_count: int | None,
    field_ratio: float | None,
    budget_params: float,
    params_per_unit: int,
    units_per_block: int,
    num_blocks: int,
    allocation: str,
    count_field: str,
    unit_name: str,
) -> int:
    """Units per block (uniform) or in total (global)."""
    scale = 1 if allocation == "uniform" else num_blocks
    available = units_per_block * scale
    if field_count is not None:
        if field_count > available:
            where = "per layer" if allocation == "uniform" else f"over {num_blocks} adapted layers"
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


def _pick(scores: list[torch.Tensor], counts: list[int], group_size: int) -> list[list[int]]:
    """Top-`count` units by score per block; with group_size > 1 whole groups are filled first.

    Filling groups first leaves at most one partly selected K/V group, which is what lets a GQA
    permutation make the selected query heads contiguous while every head keeps its own K/V group.
    """
    picked = []
    for block_scores, count in zip(scores, counts, strict=True):
        if group_size == 1:
            order = torch.argsort(block_scores, descending=True, stable=True)
        else:
            grouped = block_scores.reshape(-1, group_size)
            group_order = torch.argsort(grouped.max(dim=1).values, descending=True, stable=True)
            within = torch.argsort(grouped, dim=1, descending=True, stable=True)
            order = (group_order[:, None] * group_size + within[group_order]).reshape(-1)
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
    attention: list[AttentionBlock],
    ffn: list[FFNBlock],
    weights: dict[str, torch.Tensor],
) -> Selection:
    """Choose heads and channels for the adapted blocks.

    `weights` maps "<block prefix>.o_proj" / ".down_proj" to the weight that weight-based strategies score.
    """
    total_params = count_parameters(model)
    budget = config.trainable_ratio * total_params
    attention_budget = budget * config.attention_share
    ffn_budget = budget - attention_budget

    heads: dict[str, list[int]] = {}
    if attention:
        first = attention[0]
        hidden = weights[first.module("o_proj")].shape[0]
        num_heads = _count(
            config.heads_per_layer,
            config.head_ratio,
            attention_budget,
            hidden * first.head_dim,
            first.num_heads,
            len(attention),
            config.allocation,
            "heads_per_layer",
            "heads",
        )
        generator = torch.Generator().manual_seed(config.seed)
        scores = [
            _unit_scores(
                config.selection,
                generator,
                b.num_heads,
                None if config.selection == "random" else _head_norms(weights[b.module("o_proj")], b),
            )
            for b in attention
        ]
        counts = [num_heads] * len(attention) if config.allocation == "uniform" else _global_counts(scores, num_heads)
        group_size = first.group_size if config.permute else 1
        heads = {b.prefix: sel for b, sel in zip(attention, _pick(scores, counts, group_size), strict=True) if sel}

    channels: dict[str, list[int]] = {}
    if ffn:
        first_ffn = ffn[0]
        hidden = weights[first_ffn.module("down_proj")].shape[0]
        num_channels = _count(
            config.channels_per_layer,
            config.channel_ratio,
            ffn_budget,
            hidden,
            first_ffn.num_channels,
            len(ffn),
            config.allocation,
            "channels_per_layer",
            "channels",
        )
        generator = torch.Generator().manual_seed(config.seed + 1)
        scores = [
            _unit_scores(
                config.selection,
                generator,
                b.num_channels,
                None if config.selection == "random" else _channel_norms(weights[b.module("down_proj")]),
            )
            for b in ffn
        ]
        counts = [num_channels] * len(ffn) if config.allocation == "uniform" else _global_counts(scores, num_channels)
        channels = {b.prefix: sel for b, sel in zip(ffn, _pick(scores, counts, 1), strict=True) if sel}
    return Selection(heads, channels)
