"""The LoRA that S2FT is compared with: the paper's targets, its rank matched to S2FT's parameter count.

Shared by `peft-s2ft train --method lora` and the efficiency benchmark, so both compare the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

# The paper's LoRA baseline adapts q, k, v, up and down.
PAPER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def lora_params_per_rank(model: nn.Module, targets: Sequence[str]) -> int:
    """LoRA parameters added per unit of rank: the sum of in + out features over the targeted linears."""
    wanted = set(targets)
    return sum(
        module.in_features + module.out_features
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted
    )


def matched_lora_rank(model: nn.Module, targets: Sequence[str], budget: int) -> int:
    """The rank (at least 1) whose LoRA parameter count on `targets` is closest to `budget`."""
    per_rank = lora_params_per_rank(model, targets)
    if per_rank == 0:
        raise ValueError(f"the model has none of the LoRA target modules {', '.join(targets)}.")
    return max(1, round(budget / per_rank))


def lora_config(rank: int, targets: Sequence[str]) -> Any:
    """LoRA with alpha = 2 x rank and no dropout, as in the paper's comparison."""
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(targets)
    )
