"""The compared methods, each turned into a `Trainee`: a model, its optimizer and how it is fed.

Every method sees the same input path as the lower bound `limit`: token embeddings computed by the frozen
embedding, detached and marked `requires_grad`. Each method's backward graph is then the limit's graph plus
its own weight gradients, so "ratio to limit" measures exactly what a method adds; with plain `input_ids`
a PEFT method would skip the input gradient of layer 0 and could look cheaper than the bound. Full
fine-tuning trains the embedding itself, so it gets `input_ids` and back-propagates into it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from peft_s2ft.train.lora_baseline import PAPER_LORA_TARGETS, lora_config
from peft_s2ft.train.lora_baseline import matched_lora_rank as _matched_rank

METHODS = ("limit", "full", "lora", "lora-all", "s2ft", "s2ft-permute")
# "lora" is the paper's baseline (q, k, v, up, down); "lora-all" adapts every linear layer.
LORA_TARGETS = {
    "lora": PAPER_LORA_TARGETS,
    "lora-all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
LEARNING_RATE = 1e-5
# Methods that change the base weights (full fine-tuning; co-permutation, once at set-up) get their own copy of
# them. The others share one frozen copy, so that six 1B-class models are not six times in memory: they only read
# it (S2FT's forward and backward never write the base weight).
WRITES_BASE_WEIGHTS = ("full", "s2ft-permute")


@dataclass
class Trainee:
    """One method ready to train: `feed` is "embeds" (detached embeddings needing grad) or "ids"."""

    method: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    feed: str
    lora_rank: int | None = None

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def copy_for(method: str, base: nn.Module) -> nn.Module:
    """A copy of `base` (whose weights must be frozen) that `method` may turn into its trainee."""
    if method in WRITES_BASE_WEIGHTS:
        return copy.deepcopy(base)
    shared = {id(t): t for t in (*base.parameters(), *base.buffers())}
    return copy.deepcopy(base, memo=shared)


def s2ft_config(method: str):
    """The S2FT configuration of `method`: the package defaults, optionally with co-permutation."""
    import peft_s2ft

    return peft_s2ft.S2FTConfig(task_type="CAUSAL_LM", permute=method == "s2ft-permute")


def s2ft_trainable_count(base: nn.Module) -> int:
    """Trainable parameters of the default S2FT adapter on `base` (the budget LoRA's rank is matched to)."""
    import peft

    model = peft.get_peft_model(copy.deepcopy(base), s2ft_config("s2ft"))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matched_lora_rank(base: nn.Module, method: str, budget: int) -> int:
    """The rank whose LoRA parameter count (on `method`'s targets) is closest to `budget` (at least 1)."""
    return _matched_rank(base, LORA_TARGETS[method], budget)


def prepare(method: str, model: nn.Module, *, lora_rank: int | None = None, peft_feed: str = "embeds") -> Trainee:
    """Turn `model` (a private copy, modified in place) into the trainee of `method`."""
    import peft

    rank = None
    if method == "limit":
        model.requires_grad_(False)
        feed = "embeds"
    elif method == "full":
        model.requires_grad_(True)
        feed = "ids"
    elif method in LORA_TARGETS:
        if lora_rank is None:
            raise ValueError(f"{method} needs a LoRA rank.")
        rank = lora_rank
        model, feed = peft.get_peft_model(model, lora_config(rank, LORA_TARGETS[method])), peft_feed
    elif method in ("s2ft", "s2ft-permute"):
        model, feed = peft.get_peft_model(model, s2ft_config(method)), peft_feed
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}.")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE) if params else None
    return Trainee(method, model.train(), optimizer, feed, rank)
