"""Adapters saved before the architecture descriptions (f60f4aa, leaf-name target_modules) still load exactly."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

import peft_s2ft  # noqa: F401

FIXTURE = Path(__file__).parent / "fixtures" / "adapter-f60f4aa-llama"


def _base() -> torch.nn.Module:
    """The tiny Llama the fixture was made on (tests/fixtures' adapter was saved from this exact model)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def test_an_adapter_saved_by_the_previous_version_reproduces_its_logits():
    expected = load_file(FIXTURE / "expected.safetensors")
    model = PeftModel.from_pretrained(_base(), FIXTURE)
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"])
    trained = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, peft_s2ft.S2FTLayer)}
    assert trained == {"o_proj", "v_proj", "down_proj", "up_proj"}
