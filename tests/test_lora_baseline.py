"""The parameter-matched LoRA baseline shared by `peft-s2ft train --method lora` and the benchmark."""

import pytest
from torch import nn

from peft_s2ft.train.lora_baseline import PAPER_LORA_TARGETS, lora_config, lora_params_per_rank, matched_lora_rank


def _block() -> nn.Module:
    block = nn.Module()
    block.q_proj, block.o_proj, block.down_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(32, 8)
    return block


def test_params_per_rank_counts_only_the_targets():
    assert lora_params_per_rank(_block(), PAPER_LORA_TARGETS) == (8 + 8) + (32 + 8)  # q and down, not o


def test_rank_is_the_closest_to_the_budget_and_at_least_one():
    assert matched_lora_rank(_block(), PAPER_LORA_TARGETS, 3 * 56 + 20) == 3
    assert matched_lora_rank(_block(), PAPER_LORA_TARGETS, 1) == 1


def test_a_model_without_the_targets_is_a_clear_error():
    with pytest.raises(ValueError, match="none of the LoRA target modules q_proj"):
        matched_lora_rank(nn.Linear(4, 4), PAPER_LORA_TARGETS, 100)


def test_config_is_the_papers_comparison():
    config = lora_config(4, PAPER_LORA_TARGETS)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.0)
    assert set(config.target_modules) == set(PAPER_LORA_TARGETS)
