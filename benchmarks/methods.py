"""The compared methods, each turned into a `Trainee`: a model, its optimizer and how it is fed.

Every method sees the same input path as the lower bound `limit`: token embeddings computed by the frozen
embedding, detached and marked `requires_grad`. Each method's backward graph is then the limit's graph plus
its own weight gradients, so "ratio to limit" measures exactly what a method adds; with plain `input_ids`
a PEFT method would skip the input gradient of layer 0 and could look cheaper than the bound. Full
fine-tuning trains the embedding itself, so it gets `input_ids` and back-propagates into it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from peft_s2ft.train.lora_baseline import PAPER_LORA_TARGETS, lora_config

METHODS = ("limit", "full", "lora", "lora-all", "lora-experts", "s2ft", "s2ft-permute", "paca")
# On a 4-bit (bitsandbytes nf4, float32 compute) copy of the base, asked for by name (--methods): the quantized
# lower bound (every weight frozen), QLoRA (LoRA's paper targets) and QS2FT (the default S2FT). Their ratios are
# to `qlimit` (report.py). Needs the [quant] extra.
QUANTIZED_METHODS = ("qlimit", "qlora", "qs2ft")
ALL_METHODS = (*METHODS, *QUANTIZED_METHODS)
LORA_METHODS = ("lora", "lora-all", "lora-experts", "qlora")
# Methods whose size is a rank-like count matched to S2FT's trainable parameters: LoRA's rank, PaCA's r.
MATCHED_METHODS = (*LORA_METHODS, "paca")


@dataclass(frozen=True)
class LoraTargets:
    """What one LoRA method adapts: PEFT's `target_modules` (names or path suffixes, or one regex that must match
    a whole module path) and `target_parameters` (fused 3-D expert weights, reached through `lora.ParamWrapper`)."""

    modules: tuple[str, ...] | str
    parameters: tuple[str, ...] = ()


# Per family (transformers `model_type`), the targets of each LoRA method, by that family's module names:
# "lora" is the paper's baseline (q, k, v, up, down; a fused projection holding any of them is adapted whole),
# "lora-all" adapts every linear map of the layers, "lora-experts" (MoE only) is the paper's baseline with up and
# down reached inside the fused experts. Families missing here get the Llama names.
_LLAMA = {
    "lora": LoraTargets(PAPER_LORA_TARGETS),
    "lora-all": LoraTargets(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
}
_QKV = ("q_proj", "k_proj", "v_proj")
_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# Fused experts are 3-D parameters, not modules: target_modules reaches only the attention of an MoE layer.
_MOE = {
    "lora": LoraTargets(_QKV),
    "lora-all": LoraTargets((*_QKV, "o_proj"), _EXPERTS),  # not the router (`mlp.gate`)
    "lora-experts": LoraTargets(_QKV, _EXPERTS),
}
# BERT's leaf name `dense` is the attention output, the FFN up (`intermediate.dense`), the FFN down
# (`layer.N.output.dense`) and the pooler: only a regex over the whole path tells them apart.
_BERT_LAYER = r".*\.layer\.\d+\."
LORA_TARGETS: dict[str, dict[str, LoraTargets]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3"), _LLAMA),
    "phi3": {
        "lora": LoraTargets(("qkv_proj", "gate_up_proj", "down_proj")),
        "lora-all": LoraTargets(("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    },
    # `c_proj` names both the attention output and the FFN down projection; the paper's baseline has only the latter.
    "gpt2": {
        "lora": LoraTargets(("c_attn", "c_fc", "mlp.c_proj")),
        "lora-all": LoraTargets(("c_attn", "c_proj", "c_fc")),
    },
    "gpt_neox": {
        "lora": LoraTargets(("query_key_value", "dense_h_to_4h", "dense_4h_to_h")),
        "lora-all": LoraTargets(("query_key_value", "attention.dense", "dense_h_to_4h", "dense_4h_to_h")),
    },
    "bert": {
        "lora": LoraTargets(_BERT_LAYER + r"(attention\.self\.(query|key|value)|intermediate\.dense|output\.dense)"),
        "lora-all": LoraTargets(
            _BERT_LAYER + r"(attention\.(self\.(query|key|value)|output\.dense)|intermediate\.dense|output\.dense)"
        ),
    },
    **dict.fromkeys(("mixtral", "qwen3_moe", "olmoe"), _MOE),
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
    task_type: str = "CAUSAL_LM"

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def labels(self, ids: torch.Tensor) -> torch.Tensor:
        """The labels a step on `ids` trains with: the tokens themselves for a causal LM (the model shifts them),
        for a sequence classifier a class per sequence derived from its first token (deterministic, balanced
        enough for random ids)."""
        if self.task_type == "SEQ_CLS":
            return ids[:, 0] % self.model.config.num_labels
        return ids


def copy_for(method: str, base: nn.Module) -> nn.Module:
    """A copy of `base` (whose weights must be frozen) that `method` may turn into its trainee."""
    if method in QUANTIZED_METHODS:
        return quantized_copy(base)
    if method in WRITES_BASE_WEIGHTS:
        return copy.deepcopy(base)
    shared = {id(t): t for t in (*base.parameters(), *base.buffers())}
    return copy.deepcopy(base, memo=shared)


def quantized_copy(base: nn.Module) -> nn.Module:
    """`base` quantized to nf4 by transformers (saved and reloaded with a BitsAndBytesConfig, as a user loads a
    QLoRA base), float32 compute, then `prepare_model_for_kbit_training` without gradient checkpointing (which
    no other method here uses)."""
    import tempfile

    import transformers
    from peft import prepare_model_for_kbit_training

    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    with tempfile.TemporaryDirectory() as folder:
        base.save_pretrained(folder)
        auto_class = type(base).__name__
        loader = getattr(transformers, auto_class, transformers.AutoModelForCausalLM)
        model = loader.from_pretrained(folder, quantization_config=quantization).to(base.device)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.config.use_cache = False
    return model.train()


def s2ft_config(method: str, task_type: str = "CAUSAL_LM"):
    """The S2FT configuration of `method`: the package defaults, optionally with co-permutation."""
    import peft_s2ft

    return peft_s2ft.S2FTConfig(task_type=task_type, permute=method == "s2ft-permute")


def s2ft_trainable_count(base: nn.Module, task_type: str = "CAUSAL_LM") -> int:
    """Trainable parameters of the default S2FT adapter on `base` (the budget LoRA's rank is matched to)."""
    import peft

    model = peft.get_peft_model(copy_for("s2ft", base), s2ft_config("s2ft", task_type))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_targets(model: nn.Module, method: str) -> LoraTargets | None:
    """The targets of LoRA method `method` on `model`'s family, or None where the method does not apply."""
    return LORA_TARGETS.get(model.config.model_type, _LLAMA).get("lora" if method == "qlora" else method)


def method_lora_config(rank: int, targets: LoraTargets, task_type: str = "CAUSAL_LM"):
    """The paper's LoRA (`peft_s2ft.train.lora_baseline.lora_config`: alpha = 2 x rank, no dropout) on `targets`."""
    modules = targets.modules if isinstance(targets.modules, str) else list(targets.modules)
    return dataclasses.replace(
        lora_config(rank, ()),
        task_type=task_type,
        target_modules=modules,
        target_parameters=list(targets.parameters) or None,
    )


def paca_config(r: int, task_type: str = "CAUSAL_LM"):
    """PaCA (peft_s2ft.PaCAConfig) with `r` random input columns in every linear layer but the output layer."""
    import peft_s2ft

    return peft_s2ft.PaCAConfig(r=r, task_type=task_type)


def _config_of(method: str, base: nn.Module, rank: int, task_type: str):
    if method == "paca":
        return paca_config(rank, task_type)
    return method_lora_config(rank, lora_targets(base, method), task_type)


def _trainable_count(base: nn.Module, method: str, rank: int, task_type: str) -> int:
    import peft

    # QLoRA trains what LoRA trains on the same targets: count on a float copy instead of quantizing twice.
    model = peft.get_peft_model(copy_for("lora", base), _config_of(method, base, rank, task_type))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matched_lora_rank(base: nn.Module, method: str, budget: int, task_type: str = "CAUSAL_LM") -> int:
    """The rank (LoRA) or column count (PaCA) whose trainable-parameter count on `method`'s targets is closest to
    `budget` (at least 1).

    The count is read off the adapted model at ranks 1 and 2, so that it is right for every kind of target
    (`nn.Linear`, GPT-2's `Conv1D`, fused expert parameters, whose LoRA is per expert) and for what PEFT trains
    besides the adapter (a classifier head in `modules_to_save`, which S2FT's count holds as well).
    """
    one, two = (_trainable_count(base, method, rank, task_type) for rank in (1, 2))
    per_rank, fixed = two - one, 2 * one - two
    return max(1, round((budget - fixed) / per_rank))


def prepare(
    method: str,
    model: nn.Module,
    *,
    lora_rank: int | None = None,
    peft_feed: str = "embeds",
    task_type: str = "CAUSAL_LM",
) -> Trainee:
    """Turn `model` (a private copy, modified in place) into the trainee of `method`."""
    import peft

    rank = None
    if method in ("limit", "qlimit"):
        model.requires_grad_(False)
        feed = "embeds"
    elif method == "full":
        model.requires_grad_(True)
        feed = "ids"
    elif method in LORA_METHODS:
        targets = lora_targets(model, method)
        if targets is None:
            raise ValueError(f"{method} does not apply to {model.config.model_type} models.")
        if lora_rank is None:
            raise ValueError(f"{method} needs a LoRA rank.")
        rank = lora_rank
        model, feed = peft.get_peft_model(model, method_lora_config(rank, targets, task_type)), peft_feed
    elif method in ("s2ft", "s2ft-permute", "qs2ft"):
        model, feed = peft.get_peft_model(model, s2ft_config(method, task_type)), peft_feed
    elif method == "paca":
        if lora_rank is None:
            raise ValueError("paca needs its column count r (passed as lora_rank).")
        rank = lora_rank
        model, feed = peft.get_peft_model(model, paca_config(rank, task_type)), peft_feed
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}.")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE) if params else None
    return Trainee(method, model.train(), optimizer, feed, rank, task_type)
