"""Discovery of the coupled structures S2FT permutes: attention (Q,K,V -> O) and FFN (Up,Gate -> Down).

Works structurally on the Llama family (Llama, Mistral, Qwen2, Qwen3, ...): any decoder layer with a
`self_attn` holding q/k/v/o projections and an `mlp` holding gate/up/down projections.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_NAMES = ("gate_proj", "up_proj", "down_proj")

# The modules S2FT trains, and along which axis of their (out, in) weight.
COLUMN_TRAINED = ("o_proj", "down_proj")  # input columns of selected heads / channels
ROW_TRAINED = ("v_proj", "up_proj")  # output rows of selected K/V groups / channels (optional)


@dataclass(frozen=True)
class AttentionBlock:
    """Q,K,V -> O of one layer. Query head h uses the K/V head h // group_size."""

    layer: int
    prefix: str  # module path of the attention module, e.g. "model.layers.3.self_attn"
    num_heads: int
    num_kv_heads: int
    head_dim: int
    member_names = ATTENTION_NAMES

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def module(self, name: str) -> str:
        return f"{self.prefix}.{name}"


@dataclass(frozen=True)
class FFNBlock:
    """Gate,Up -> Down of one layer; channel c is row c of gate/up and column c of down."""

    layer: int
    prefix: str
    num_channels: int
    member_names = FFN_NAMES

    def module(self, name: str) -> str:
        return f"{self.prefix}.{name}"


@dataclass(frozen=True)
class ModelStructure:
    attention: tuple[AttentionBlock, ...]
    ffn: tuple[FFNBlock, ...]

    def role_of(self, module_key: str) -> tuple[str, AttentionBlock | FFNBlock] | None:
        """Return (projection name, block) for a module path that belongs to a discovered block."""
        prefix, _, name = module_key.rpartition(".")
        for block in (*self.attention, *self.ffn):
            if block.prefix == prefix and name in (ATTENTION_NAMES + FFN_NAMES):
                return name, block
        return None


class UnsupportedModelError(ValueError):
    pass


_LAYER_INDEX = re.compile(r"\.(\d+)$")


def _find_decoder_layers(model: nn.Module) -> list[tuple[str, int, nn.Module]]:
    layers = []
    for name, module in model.named_modules():
        match = _LAYER_INDEX.search(name)
        if match and hasattr(module, "self_attn") and hasattr(module, "mlp"):
            layers.append((name, int(match.group(1)), module))
    return layers


def base_layer_of(module: nn.Module) -> nn.Module:
    """The module itself, or the layer a PEFT tuner layer (of any method) wraps."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _require_linear(parent: nn.Module, parent_name: str, child: str) -> nn.Linear:
    module = getattr(parent, child, None)
    base = None if module is None else base_layer_of(module)
    if not isinstance(base, nn.Linear):
        found = "nothing" if module is None else type(module).__name__
        raise UnsupportedModelError(
            f"S2FT needs an nn.Linear named '{child}' under '{parent_name}', found {found}. Supported are "
            "Llama-family decoders (Llama, Mistral, Qwen2, Qwen3) with q/k/v/o_proj and gate/up/down_proj."
        )
    return base


def _model_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError("S2FT needs a transformers model with a `config` (head counts and sizes).")
    return getattr(config, "get_text_config", lambda: config)()


def discover_structure(model: nn.Module) -> ModelStructure:
    """Find every attention and FFN block of a Llama-family model and check their shapes."""
    config = _model_config(model)
    layers = _find_decoder_layers(model)
    if not layers:
        raise UnsupportedModelError(
            f"S2FT found no decoder layer (a module with `self_attn` and `mlp`) in {type(model).__name__}. "
            "Supported are Llama-family decoders (Llama, Mistral, Qwen2, Qwen3)."
        )
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    if num_heads % num_kv_heads:
        raise UnsupportedModelError(
            f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}."
        )

    attention, ffn = [], []
    for name, index, layer in layers:
        attn_name, mlp_name = f"{name}.self_attn", f"{name}.mlp"
        q, k, v, o = (_require_linear(layer.self_attn, attn_name, n) for n in ATTENTION_NAMES)
        gate, up, down = (_require_linear(layer.mlp, mlp_name, n) for n in FFN_NAMES)
        expected = {
            "q_proj.out_features": (q.out_features, num_heads * head_dim),
            "k_proj.out_features": (k.out_features, num_kv_heads * head_dim),
            "v_proj.out_features": (v.out_features, num_kv_heads * head_dim),
            "o_proj.in_features": (o.in_features, num_heads * head_dim),
            "up_proj.out_features": (up.out_features, down.in_features),
            "gate_proj.out_features": (gate.out_features, down.in_features),
        }
        for what, (found, want) in expected.items():
            if found != want:
                raise UnsupportedModelError(
                    f"{name}: {what} is {found}, expected {want} from the config "
                    f"({num_heads} heads, {num_kv_heads} K/V heads, head_dim {head_dim})."
                )
        attention.append(AttentionBlock(index, attn_name, num_heads, num_kv_heads, head_dim))
        ffn.append(FFNBlock(index, mlp_name, down.in_features))
    return ModelStructure(tuple(attention), tuple(ffn))
