"""Base models to benchmark: the embedded SmolLM2, random-init shapes, or any `from_pretrained` source.

Random-init shapes exist because efficiency depends only on layer shapes, not on weight values, and a
1B-class layer shape cannot be downloaded here; a few such layers keep a CPU run affordable.
"""

from __future__ import annotations

import torch
from torch import nn

EMBEDDED = "smollm2-135m"

# Llama-3.2-1B layer geometry (hidden 2048, FFN 8192, 32 query / 8 key-value heads of 64) with 4 layers
# instead of 16 and a 32000 vocabulary instead of 128256: the tied LM head then keeps about the same share
# of the compute (~21%) as in the real 16-layer model, while a CPU step stays affordable.
RANDOM_SHAPES: dict[str, dict[str, int]] = {
    "llama-1b-shape": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        num_hidden_layers=4,
        vocab_size=32000,
    ),
    # A few-KB model for the smoke test: every code path, no measurable cost.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=2,
        vocab_size=512,
    ),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_base_model(name: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Build or load the base causal LM `name` in `dtype` on the CPU, in training mode, cache disabled."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name in RANDOM_SHAPES:
        config = LlamaConfig(**RANDOM_SHAPES[name], tie_word_embeddings=True, max_position_embeddings=8192)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config).to(dtype)
    else:
        source = name
        if name == EMBEDDED:
            from peft_s2ft.train.embedded_model import embedded_model_path

            source = embedded_model_path()
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.config.use_cache = False
    return model.train()
