"""Tiny random Llama / Mistral / Qwen2 / Qwen3 causal LMs in a private Hugging Face hub cache.

PEFT's decoder tests load these repo ids from the hub. Offline, the same ids resolve from the cache layout
written here ($HF_HOME/hub/models--ORG--NAME/{refs/main, snapshots/<sha>/}), with HF_HUB_OFFLINE=1. The
weights are random with a fixed seed, not the hub's files: the tests compare a model with itself.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

COMMON = dict(
    vocab_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention everywhere, the case the official S2FT code gets wrong
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.02,
)

MODELS = {
    "trl-internal-testing/tiny-random-LlamaForCausalLM": LlamaConfig(
        hidden_size=16, intermediate_size=32, tie_word_embeddings=False, **COMMON
    ),
    # An odd FFN width, as in the hub's tiny Mistral.
    "hf-internal-testing/tiny-random-MistralForCausalLM": MistralConfig(
        hidden_size=32, intermediate_size=37, tie_word_embeddings=False, sliding_window=4096, **COMMON
    ),
    # q/k/v biases, tied embeddings.
    "peft-internal-testing/tiny-dummy-qwen2": Qwen2Config(
        hidden_size=16, intermediate_size=32, tie_word_embeddings=True, **COMMON
    ),
    # q/k norms and heads x head_dim (32) != hidden (16).
    "trl-internal-testing/tiny-Qwen3ForCausalLM": Qwen3Config(
        hidden_size=16, intermediate_size=32, head_dim=8, tie_word_embeddings=True, **COMMON
    ),
}


def build(hf_home: Path) -> None:
    for seed, (repo_id, config) in enumerate(MODELS.items(), start=1234):
        org, name = repo_id.split("/")
        repo = hf_home / "hub" / f"models--{org}--{name}"
        # A snapshot per (config, transformers version): a changed model is rebuilt rather than reused.
        key = f"{repo_id}\n{config.to_json_string()}\n{transformers.__version__}\n{seed}"
        sha = hashlib.sha1(key.encode()).hexdigest()
        snapshot = repo / "snapshots" / sha
        if not snapshot.is_dir():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
            model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
            staging = snapshot.with_name(snapshot.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            model.save_pretrained(staging)
            staging.rename(snapshot)  # a snapshot folder exists only complete
            print(f"built {repo_id} ({type(model).__name__})")
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(sha)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: build_models.py HF_HOME")
    build(Path(sys.argv[1]))
