"""Base models to benchmark: the embedded SmolLM2, random-init shapes, or any `from_pretrained` source.

Random-init shapes exist because efficiency depends only on layer shapes, not on weight values, and a
1B-class layer shape cannot be downloaded here; a few such layers keep a CPU run affordable. Each shape is
data: a transformers `model_type`, the config's keyword arguments and the Auto class that builds the model
(whose head decides the PEFT task type and the loss the benchmark trains with).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

EMBEDDED = "smollm2-135m"

# PEFT task type of each Auto class a shape may name; models loaded with `from_pretrained` are causal LMs.
TASK_TYPES = {"AutoModelForCausalLM": "CAUSAL_LM", "AutoModelForSequenceClassification": "SEQ_CLS"}


@dataclass(frozen=True)
class Shape:
    """A random-init model: `AutoConfig.for_model(model_type, **config)` built by `transformers.<auto_class>`."""

    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    auto_class: str = "AutoModelForCausalLM"

    @property
    def task_type(self) -> str:
        return TASK_TYPES[self.auto_class]


# The family shapes keep the proportions of GPT-2 small / Pythia-160M (hidden 768, FFN 3072, 12 heads of 64) with
# 4 of their 12 layers and a 16384 vocabulary, which keeps the LM head's share of the matmul FLOPs (~30%) about
# what it is in those 12-layer models; Phi-3's gated FFN gets 2048 channels, the same FFN parameters as 3072
# ungated. A full run of all methods at batch 4 x 256, 8 repeats, then takes about 2-3.5 minutes on 2 idle cores.
_WIDTH = dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=4, vocab_size=16384)
# In-vocabulary special tokens: the families' defaults (32000, 50256) lie outside the smaller vocabulary.
_SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

RANDOM_SHAPES: dict[str, Shape] = {
    # Llama-3.2-1B layer geometry (hidden 2048, FFN 8192, 32 query / 8 key-value heads of 64) with 4 layers
    # instead of 16 and a 32000 vocabulary instead of 128256: the tied LM head then keeps about the same share
    # of the compute (~21%) as in the real 16-layer model, while a CPU step stays affordable.
    "llama-1b-shape": Shape(
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            num_hidden_layers=4,
            vocab_size=32000,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
        ),
    ),
    # Fused qkv_proj and gate_up_proj, full multi-head attention (as Phi-3-mini).
    "phi3-shape": Shape("phi3", dict(_WIDTH, **_SPECIAL, intermediate_size=2048, num_key_value_heads=12)),
    # Conv1D weights stored (in, out), fused c_attn, tied LM head.
    "gpt2-shape": Shape("gpt2", dict(n_embd=768, n_head=12, n_layer=4, n_inner=3072, vocab_size=16384, **_SPECIAL)),
    # Per-head interleaved query_key_value, partial rotary, parallel residual (as Pythia).
    "gpt-neox-shape": Shape("gpt_neox", dict(_WIDTH, **_SPECIAL, intermediate_size=3072)),
    # BERT-base width with 4 of its 12 layers and its own vocabulary (only looked up: no LM head), a 2-way
    # classifier on the pooled first token, trained with the classification loss.
    "bert-shape": Shape(
        "bert",
        dict(_WIDTH, vocab_size=30522, intermediate_size=3072, num_labels=2),
        "AutoModelForSequenceClassification",
    ),
    # Mixtral's proportions at hidden 512: 8 experts, top-2 routing, expert FFN 3.5 x hidden, 4 query heads per
    # K/V head. 107.5M parameters (88M of them in the experts), 33M active per token (two experts, attention, head).
    "mixtral-shape": Shape(
        "mixtral",
        dict(
            hidden_size=512,
            intermediate_size=1792,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=64,
            num_hidden_layers=4,
            num_local_experts=8,
            num_experts_per_tok=2,
            vocab_size=16384,
            max_position_embeddings=4096,
        ),
    ),
    # Few-KB models for the smoke test: every code path, no measurable cost.
    "tiny": Shape(
        "llama",
        dict(
            hidden_size=64,
            intermediate_size=256,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_hidden_layers=2,
            vocab_size=512,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
        ),
    ),
    "tiny-phi3": Shape(
        "phi3",
        dict(
            hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2, vocab_size=512, **_SPECIAL
        ),
    ),
    "tiny-gpt2": Shape("gpt2", dict(n_embd=64, n_head=4, n_layer=2, n_inner=256, vocab_size=512, **_SPECIAL)),
    "tiny-gpt-neox": Shape(
        "gpt_neox",
        dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2, vocab_size=512),
    ),
    "tiny-bert": Shape(
        "bert",
        dict(
            hidden_size=64,
            intermediate_size=256,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=512,
            num_labels=2,
        ),
        "AutoModelForSequenceClassification",
    ),
    "tiny-mixtral": Shape(
        "mixtral",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            vocab_size=512,
            max_position_embeddings=4096,
        ),
    ),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def task_type(name: str) -> str:
    """The PEFT task type the benchmark trains model `name` under (CAUSAL_LM unless its shape says otherwise)."""
    return RANDOM_SHAPES[name].task_type if name in RANDOM_SHAPES else "CAUSAL_LM"


def load_base_model(name: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Build or load the base model `name` in `dtype` on the CPU, in training mode, cache disabled."""
    import transformers

    if name in RANDOM_SHAPES:
        shape = RANDOM_SHAPES[name]
        config = transformers.AutoConfig.for_model(shape.model_type, **shape.config)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = getattr(transformers, shape.auto_class).from_config(config).to(dtype)
    else:
        source = name
        if name == EMBEDDED:
            from peft_s2ft.train.embedded_model import embedded_model_path

            source = embedded_model_path()
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.config.use_cache = False
    return model.train()
