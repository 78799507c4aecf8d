"""Tiny random models, one per architecture family, built offline for the cross-family tests.

Each family is a config factory plus the Auto class that builds it. The sizes are small enough that a build and a
forward of a (2, 12) batch take well under a second on a 2-core CPU, yet keep the shapes that catch layout bugs:
4 query heads with 2 K/V heads where the family has GQA, head_dim * heads != hidden somewhere (Qwen3, Gemma2, GPT-OSS,
DeepSeek's MLA), and odd or non-power-of-two FFN widths. See ARCHITECTURES.md (shared notes) for where heads and
channels live in each family.

`build` randomizes, after the usual init, every tensor that the init leaves at zeros or ones (biases, norm weights,
including Cohere's [heads, head_dim] and OLMo2's whole-projection q/k norms, GPT-OSS's sinks and expert biases,
DeepSeek's routing correction bias): with those at their init, a test that permutes heads or channels wrongly could
still reproduce the logits by symmetry and pass.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    CohereConfig,
    DeepseekV3Config,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    GptOssConfig,
    Llama4TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Olmo2Config,
    OlmoeConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    RobertaConfig,
)

TaskType = Literal["CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION"]
Kind = Literal["dense", "encoder", "moe"]

SEED = 0
VOCAB = 96
# 5x the usual 0.02: with hidden 32 and std 0.02, attention is almost uniform, so a test that pairs K heads with the
# wrong Q heads moved Llama's logits by only ~5e-3; at 0.1 it moves them by ~1 while a right permutation stays
# within ~1e-6.
INIT_STD = 0.1
# Noise added by `randomize_trivial_tensors`: norm weights vary by +-50% around their init. Additive tensors
# (biases, sinks) get less: a bias of std 0.5 added to every token swamped the token-dependent part of the
# residual stream, so an MoE router sent all 24 tokens of the test batch to the same experts and left some
# experts (and any permutation bug in them) unexercised. At 0.05 every expert of every MoE family gets tokens for
# `sample_input_ids(name)`, and leaving a bias unpermuted still moves Qwen2's logits by ~1.
NORM_STD = 0.5
BIAS_STD = 0.05
# Random ids start above the special tokens (pad/bos/eos are 0-2 in these configs; RoBERTa's pad is 1 and shifts
# its position ids), so a batch never contains padding by accident.
FIRST_ORDINARY_ID = 3


@dataclass(frozen=True)
class Family:
    """One architecture family: how to build its config and model, and what PEFT task type it serves."""

    name: str
    make_config: Callable[[], PretrainedConfig]
    auto_class: type  # a transformers Auto class, e.g. AutoModelForCausalLM
    task_type: TaskType
    kind: Kind


# Shared by the Llama-like decoders: 4 query heads, 2 K/V heads, an FFN width that is not a power of two.
_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=INIT_STD,
)
# Shared by GPT-2 and GPT-J, which use the n_* names.
_GPT2_LIKE = dict(
    vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=72, n_positions=64, initializer_range=INIT_STD
)
# Shared by the MoE decoders: 4 experts, top-2 routing.
_MOE = dict(_LLAMA_LIKE, num_experts_per_tok=2)


def _falcon(**kwargs: Any) -> FalconConfig:
    return FalconConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_hidden_size=72,
        max_position_embeddings=64,
        initializer_range=INIT_STD,
        **kwargs,
    )


def _bert_like(config_class: type[PretrainedConfig], **kwargs: Any) -> PretrainedConfig:
    return config_class(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=72,
        max_position_embeddings=64,
        initializer_range=INIT_STD,
        **kwargs,
    )


_DENSE: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": lambda: LlamaConfig(**_LLAMA_LIKE),
    "mistral": lambda: MistralConfig(**dict(_LLAMA_LIKE, intermediate_size=56)),
    "qwen2": lambda: Qwen2Config(**_LLAMA_LIKE),  # q/k/v biases by construction
    # head_dim * heads = 64 != hidden 32: catches code that assumes head_dim = hidden / heads.
    "qwen3": lambda: Qwen3Config(**_LLAMA_LIKE, head_dim=16),
    "gemma": lambda: GemmaConfig(**dict(_LLAMA_LIKE, intermediate_size=45), head_dim=8),
    # A window shorter than the test batch's 12 tokens, so the sliding layer really slides.
    "gemma2": lambda: Gemma2Config(
        **_LLAMA_LIKE,
        head_dim=12,
        query_pre_attn_scalar=12,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "gemma3_text": lambda: Gemma3TextConfig(
        **dict(_LLAMA_LIKE, intermediate_size=63),
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
    # Fused qkv_proj and gate_up_proj; odd FFN width so gate/up halves are not power-of-two aligned.
    "phi3": lambda: Phi3Config(**dict(_LLAMA_LIKE, intermediate_size=45), pad_token_id=0),
    # GPT-2's Conv1D stores weights (in, out): heads and channels are COLUMNS of c_attn / c_fc.
    "gpt2": lambda: GPT2Config(**_GPT2_LIKE),
    # Partial rotary (4 of head_dim 8); parallel attention + MLP.
    "gptj": lambda: GPTJConfig(**_GPT2_LIKE, rotary_dim=4),
    "gpt_neox": lambda: GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=72,
        max_position_embeddings=64,
        initializer_range=INIT_STD,
    ),
    "opt": lambda: OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=72,
        max_position_embeddings=64,
        init_std=INIT_STD,
    ),
    # Falcon-7B layout: one shared K/V head (multi_query=True is the default).
    "falcon-mqa": lambda: _falcon(),
    # Falcon-RW layout without ALiBi: per-head interleaved (Q, K, V) like GPT-NeoX, with biases.
    "falcon-mha": lambda: _falcon(multi_query=False, new_decoder_architecture=False, bias=True),
    # Falcon-40B/180B layout: K/V groups, each holding its G query heads then K then V.
    "falcon-new": lambda: _falcon(new_decoder_architecture=True, num_kv_heads=2),
    # Falcon-RW-1B: ALiBi slopes depend on the head index, so heads must not be permuted.
    "falcon-alibi": lambda: _falcon(alibi=True, multi_query=False, parallel_attn=False, bias=True),
    "olmo2": lambda: Olmo2Config(**dict(_LLAMA_LIKE, intermediate_size=56)),
    "cohere": lambda: CohereConfig(**_LLAMA_LIKE, use_qk_norm=True),
}


def _encoder_families() -> dict[str, Family]:
    """BERT and RoBERTa, each under the three encoder tasks: a classifier head, a token head, and no head."""
    families = {}
    for base, config_class, extra in (
        ("bert", BertConfig, {}),
        ("roberta", RobertaConfig, {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}),
    ):
        for suffix, auto_class, task_type, labels in (
            ("seq-cls", AutoModelForSequenceClassification, "SEQ_CLS", {"num_labels": 3}),
            ("token-cls", AutoModelForTokenClassification, "TOKEN_CLS", {}),
            ("features", AutoModel, "FEATURE_EXTRACTION", {}),
        ):
            name = f"{base}-{suffix}"
            make = functools.partial(_bert_like, config_class, **extra, **labels)
            families[name] = Family(name, make, auto_class, task_type, "encoder")
    return families


_MOES: dict[str, Callable[[], PretrainedConfig]] = {
    "mixtral": lambda: MixtralConfig(**_MOE, num_local_experts=4),
    # Layer 0 dense (mlp_only_layers) with an odd width, layer 1 sparse with a shared expert.
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **dict(_MOE, intermediate_size=63),
        num_experts=4,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=56,
        mlp_only_layers=[0],
        qkv_bias=True,
    ),
    "qwen3_moe": lambda: Qwen3MoeConfig(**_MOE, num_experts=4, moe_intermediate_size=40),
    "olmoe": lambda: OlmoeConfig(**_MOE, num_experts=4),
    # head_dim * heads = 40 != hidden 32; alternating sliding/full layers with a window under 12 tokens.
    "gpt_oss": lambda: GptOssConfig(
        **_MOE,
        num_local_experts=4,
        head_dim=10,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
    # Layer 0 dense (intermediate_size_mlp, odd), layer 1 MoE (interleave step 2) with its shared expert.
    "llama4_text": lambda: Llama4TextConfig(
        **_MOE,
        head_dim=8,
        num_local_experts=4,
        intermediate_size_mlp=63,
        interleave_moe_layer_step=2,
        attention_chunk_size=8,
    ),
    # MLA: q through a low-rank q_a/q_b, K/V through a shared latent; v_head_dim differs from the q/k widths.
    "deepseek_v3": lambda: DeepseekV3Config(
        **dict(_MOE, num_key_value_heads=4, intermediate_size=63),
        moe_intermediate_size=40,
        n_routed_experts=4,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
    ),
}

FAMILIES: dict[str, Family] = {
    **{name: Family(name, make, AutoModelForCausalLM, "CAUSAL_LM", "dense") for name, make in _DENSE.items()},
    **_encoder_families(),
    **{name: Family(name, make, AutoModelForCausalLM, "CAUSAL_LM", "moe") for name, make in _MOES.items()},
}


def randomize_trivial_tensors(
    model: torch.nn.Module, seed: int = SEED, norm_std: float = NORM_STD, other_std: float = BIAS_STD
) -> None:
    """Add seeded normal noise to every bias, 1-D tensor and constant-filled tensor (parameters and saved buffers).

    The usual init leaves biases at 0 and norm weights at 1 (Gemma's at 0), which are symmetric under any
    permutation of heads or channels, so a test with them untouched cannot tell a right permutation from a wrong one.
    Tensors of a norm module get `norm_std` (they scale); the rest (biases, GPT-OSS sinks, expert and routing
    biases) get `other_std`, see BIAS_STD.
    """
    generator = torch.Generator().manual_seed(seed)
    persistent = set(model.state_dict())
    tensors = list(model.named_parameters())
    tensors += [(name, b) for name, b in model.named_buffers() if name in persistent and b.is_floating_point()]
    with torch.no_grad():
        for name, tensor in tensors:
            flat = tensor.detach().reshape(-1)
            constant = flat.numel() > 1 and bool((flat == flat[0]).all())
            if tensor.ndim == 1 or name.endswith("bias") or constant:
                owner = model.get_submodule(name.rpartition(".")[0])
                std = norm_std if "norm" in type(owner).__name__.lower() else other_std
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std
                tensor.add_(noise.to(tensor.dtype))


def build(name: str, directory: str | os.PathLike[str]) -> str:
    """Build family `name` with a fixed seed, randomize its trivial tensors and save it to `directory`.

    Returns the path as a string: tests reload from it with `load` so the model's name_or_path is set, as it is
    for a hub model.
    """
    family = FAMILIES[name]
    torch.manual_seed(SEED)
    model = family.auto_class.from_config(family.make_config())
    randomize_trivial_tensors(model)
    model.save_pretrained(directory)
    return str(directory)


def load(path: str | os.PathLike[str], name: str, **kwargs: Any) -> torch.nn.Module:
    """Reload a model saved by `build` with its family's Auto class, in eval mode (dropout off, deterministic)."""
    return FAMILIES[name].auto_class.from_pretrained(path, **kwargs).eval()


def sample_input_ids(name: str, batch: int = 2, length: int = 12, seed: int = SEED) -> torch.Tensor:
    """Seeded random token ids for family `name`, avoiding its special (pad/bos/eos) ids."""
    vocab_size = FAMILIES[name].make_config().vocab_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_ORDINARY_ID, vocab_size, (batch, length), generator=generator)


def main_output(output: Any) -> torch.Tensor:
    """The tensor a test compares: `logits` for LM/classification heads, `last_hidden_state` for a bare encoder."""
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output.last_hidden_state
