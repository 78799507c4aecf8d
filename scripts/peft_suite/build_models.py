"""Every tiny model PEFT's adapted suites load, built offline into a private Hugging Face hub cache.

PEFT's tests load these repo ids from the hub. Offline, the same ids resolve from the cache layout written
here ($HF_HOME/hub/models--ORG--NAME/{refs/main, snapshots/<sha>/}), with HF_HUB_OFFLINE=1. The weights are
random with a fixed seed, not the hub's files: the tests compare a model with itself. Each id gets its hub
repo's architecture class and model type; the shapes are the hub's where PEFT or the generating script tell
them (noted per model), else small ones of the same kind. `adapt_tests.py` checks that every id in the
adapted model lists is built here.

`FAMILIES` groups the ids for PEFT_SUITE_SCOPE (see run.sh); `llama` is the Llama family S2FT supports today.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    Gemma3TextConfig,
    GenerationConfig,
    GPT2Config,
    GPT2Tokenizer,
    GPTJConfig,
    GptOssConfig,
    Llama4TextConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    RobertaConfig,
)

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
# Byte-level BPE without merges: 4 specials + 256 byte symbols, OPT's special-token layout.
TOKENIZER_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
TOKENIZER_SIZE = len(TOKENIZER_SPECIALS) + 256


@dataclass(frozen=True)
class Tiny:
    family: str
    config: PretrainedConfig
    auto_class: type = AutoModelForCausalLM
    seed: int = 0
    tokenizer: bool = False  # only PEFT's prompt-tuning tests on OPT load a tokenizer
    dtype: torch.dtype = torch.float32


ENCODER = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    type_vocab_size=16,
    initializer_range=0.02,
)

MODELS = {
    # ---- the Llama family S2FT supports today (seeds 1234-1237 as before: the same weights as before) ----
    "trl-internal-testing/tiny-random-LlamaForCausalLM": Tiny(
        "llama", LlamaConfig(hidden_size=16, intermediate_size=32, tie_word_embeddings=False, **COMMON), seed=1234
    ),
    # An odd FFN width, as in the hub's tiny Mistral.
    "hf-internal-testing/tiny-random-MistralForCausalLM": Tiny(
        "llama",
        MistralConfig(hidden_size=32, intermediate_size=37, tie_word_embeddings=False, sliding_window=4096, **COMMON),
        seed=1235,
    ),
    # q/k/v biases, tied embeddings.
    "peft-internal-testing/tiny-dummy-qwen2": Tiny(
        "llama", Qwen2Config(hidden_size=16, intermediate_size=32, tie_word_embeddings=True, **COMMON), seed=1236
    ),
    # q/k norms and heads x head_dim (32) != hidden (16).
    "trl-internal-testing/tiny-Qwen3ForCausalLM": Tiny(
        "llama",
        Qwen3Config(hidden_size=16, intermediate_size=32, head_dim=8, tie_word_embeddings=True, **COMMON),
        seed=1237,
    ),
    # ---- the other decoders of PEFT's test_decoder_models.py ----
    # PEFT's testing_common: "the fc1 and fc2 layers in OPT have size (16, 4)". OPT's token layout (pad 1,
    # bos = eos 2) and a tokenizer: test_prompt_tuning_text_tokenizer_kwargs / _trust_remote_code load one.
    "peft-internal-testing/tiny-random-OPTForCausalLM": Tiny(
        "opt",
        OPTConfig(
            vocab_size=TOKENIZER_SIZE,
            hidden_size=16,
            ffn_dim=4,
            word_embed_proj_dim=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=100,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        ),
        seed=1238,
        tokenizer=True,
    ),
    # GPT-2 keeps its projections in transformers' Conv1D (weight stored in x out); one id with an odd FFN width.
    "peft-internal-testing/tiny-random-GPT2LMHeadModel": Tiny(
        "gpt2",
        GPT2Config(
            vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_inner=37, n_positions=512, bos_token_id=1, eos_token_id=2
        ),
        seed=1239,
    ),
    "hf-internal-testing/tiny-random-gpt2": Tiny(
        "gpt2",
        GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2),
        seed=1240,
    ),
    # Parallel attention + MLP in one block, partial rotary.
    "peft-internal-testing/tiny-random-GPTJForCausalLM": Tiny(
        "gptj",
        GPTJConfig(
            vocab_size=128,
            n_embd=32,
            n_layer=2,
            n_head=4,
            rotary_dim=4,
            n_positions=512,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        ),
        seed=1241,
    ),
    # Scaled embeddings (embed_scale, which PEFT's test_lora_embed_scale_is_applied* sets), q/k norms, a sliding
    # and a full attention layer, head_dim x heads != hidden.
    "hf-internal-testing/tiny-random-Gemma3ForCausalLM": Tiny(
        "gemma3",
        Gemma3TextConfig(
            hidden_size=32,
            intermediate_size=37,
            head_dim=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            **COMMON,
        ),
        seed=1242,
    ),
    # ---- the MoE models of PEFT's test_target_parameters.py (experts as 3-d nn.Parameters, no nn.Linear) ----
    # The hub checkpoint has no dense block and no NoPE layer (every layer MoE and RoPE). Its vocabulary is the
    # real tokenizer's (202k); PEFT's test_target_multiple_parameters_on_same_module needs a large one (its loss
    # is the sum of all logits; with 128 tokens, layer 1's LoRA factors move by < 0.1 in its 10 steps).
    "trl-internal-testing/tiny-Llama4ForCausalLM": Tiny(
        "moe",
        Llama4TextConfig(
            hidden_size=16,
            intermediate_size=32,
            intermediate_size_mlp=64,
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=1,
            interleave_moe_layer_step=1,
            no_rope_layers=[1, 1],
            **{**COMMON, "vocab_size": 2048},
        ),
        seed=1243,
    ),
    # trl's scripts/generate_tiny_models.py: hidden 8, 4 heads (2 K/V, head_dim 64 by default), 2 layers,
    # intermediate 32, 4 experts, 2 per token, bf16 (PEFT's test casts it to float).
    "trl-internal-testing/tiny-GptOssForCausalLM": Tiny(
        "moe",
        GptOssConfig(
            hidden_size=8,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            **{**COMMON, "max_position_embeddings": 131072},  # the default, what YaRN's rope factor 32 expects
        ),
        seed=1244,
        dtype=torch.bfloat16,
    ),
    # PEFT's TestTargetParameters compares LoRA on a module with LoRA on its weight on this (other) Llama id.
    "hf-internal-testing/tiny-random-LlamaForCausalLM": Tiny(
        "llama", LlamaConfig(hidden_size=16, intermediate_size=32, tie_word_embeddings=False, **COMMON), seed=1245
    ),
    # ---- BERT / RoBERTa (sequence/token classification, question answering, feature extraction) ----
    # The token-classification and QA tests load the *ForSequenceClassification ids with their own auto class.
    "peft-internal-testing/tiny-random-BertForSequenceClassification": Tiny(
        "bert", BertConfig(**ENCODER), AutoModelForSequenceClassification, seed=1246
    ),
    "peft-internal-testing/tiny-random-RobertaForSequenceClassification": Tiny(
        "roberta",
        RobertaConfig(**ENCODER, max_position_embeddings=514, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        AutoModelForSequenceClassification,
        seed=1247,
    ),
    # Dropped from test_seq_classifier.py's list (adapt_tests.DROP), built so that re-adding it is one line. trl's
    # scripts/generate_tiny_models.py: Llama-3.2-1B's config (head_dim 64, tied embeddings) with hidden 16,
    # 4 heads (2 K/V), 2 layers, intermediate 32 and a single label.
    "trl-internal-testing/tiny-LlamaForSequenceClassification-3.2": Tiny(
        "llama",
        LlamaConfig(
            hidden_size=16, intermediate_size=32, head_dim=64, num_labels=1, tie_word_embeddings=True, **COMMON
        ),
        AutoModelForSequenceClassification,
        seed=1250,
    ),
    "peft-internal-testing/tiny-random-BertModel": Tiny("bert", BertConfig(**ENCODER), AutoModel, seed=1248),
    "peft-internal-testing/tiny-random-RobertaModel": Tiny(
        "roberta",
        RobertaConfig(**ENCODER, max_position_embeddings=514, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        AutoModel,
        seed=1249,
    ),
}
FAMILIES = sorted({tiny.family for tiny in MODELS.values()})


def ids_of(families) -> set[str]:
    return {repo_id for repo_id, tiny in MODELS.items() if tiny.family in families}


def _tokenizer() -> GPT2Tokenizer:
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = list(TOKENIZER_SPECIALS) + sorted(ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    return GPT2Tokenizer(
        vocab=vocab, merges=[], bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _generation_config(config: PretrainedConfig) -> GenerationConfig:
    ids = {name: getattr(config, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return GenerationConfig(**{name: value for name, value in ids.items() if value is not None})


def build(hf_home: Path) -> None:
    assert len({tiny.seed for tiny in MODELS.values()}) == len(MODELS), "every model needs its own seed"
    for repo_id, tiny in MODELS.items():
        org, name = repo_id.split("/")
        repo = hf_home / "hub" / f"models--{org}--{name}"
        # A snapshot per (config, class, transformers version, ...): a changed model is rebuilt rather than reused.
        key = "\n".join(
            [
                repo_id,
                tiny.config.to_json_string(),
                tiny.auto_class.__name__,
                transformers.__version__,
                str(tiny.seed),
                str(tiny.tokenizer),
                str(tiny.dtype),
            ]
        )
        sha = hashlib.sha1(key.encode()).hexdigest()
        snapshot = repo / "snapshots" / sha
        if not snapshot.is_dir():
            torch.manual_seed(tiny.seed)
            model = tiny.auto_class.from_config(tiny.config).to(tiny.dtype)
            if model.can_generate():
                model.generation_config = _generation_config(tiny.config)
            staging = snapshot.with_name(snapshot.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            model.save_pretrained(staging)
            if tiny.tokenizer:
                _tokenizer().save_pretrained(staging)
            staging.rename(snapshot)  # a snapshot folder exists only complete
            print(f"built {repo_id} ({type(model).__name__})")
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(sha)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: build_models.py HF_HOME")
    build(Path(sys.argv[1]))
