"""Tiny random Llama-family models, saved to a temp folder and reloaded (so name_or_path is set)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import peft_s2ft  # noqa: F401  (registers the tuner)

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
CONFIGS = {
    "llama-mha": lambda: LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=4),
    "llama-gqa": lambda: LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2),
    "qwen2-bias": lambda: Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2),
    "qwen3": lambda: Qwen3Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
}
MODEL_NAMES = list(CONFIGS)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    dirs = {}
    for name, make in CONFIGS.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make())
        if name == "qwen2-bias":  # make the q/k/v biases non-trivial so permuting them matters
            with torch.no_grad():
                for module in model.modules():
                    if getattr(module, "bias", None) is not None:
                        module.bias.normal_(std=0.5)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        dirs[name] = str(path)
    return dirs


@pytest.fixture
def load(model_dirs):
    def _load(name: str = "llama-gqa", **kwargs):
        return AutoModelForCausalLM.from_pretrained(model_dirs[name], **kwargs).eval()

    return _load


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
