"""DeepSeek-V3 (multi-head latent attention).

Per head h: Q rows h * (nope + rope) of `q_b_proj` (or `q_proj` without a query LoRA rank); K (no-rope part) and V
rows of `kv_b_proj`, interleaved per head as [k_nope_h; v_h]; O columns h * v_head_dim. `kv_a_proj_with_mqa` is a
latent shared by all heads (plus one rope key for all heads): it never moves. `config.head_dim` is the rope width,
not a head's width, so the geometry comes from qk_nope_head_dim, qk_rope_head_dim and v_head_dim.
"""

from .description import HEAD, IN, KV_GROUP, OUT, AttentionLayout, Family, Part, geometry
from .layouts import LLAMA_FFN, separate_ffn

KV = "self_attn.kv_b_proj"


def deepseek_symbols(config) -> dict[str, int]:
    heads = config.num_attention_heads
    nope, rope = config.qk_nope_head_dim, config.qk_rope_head_dim
    # K and V come per query head out of kv_b_proj: one "K/V group" per head.
    return geometry(heads, heads, nope + rope, config.v_head_dim, nope=nope)


def _attention(query: str) -> AttentionLayout:
    return AttentionLayout(
        output=Part("self_attn.o_proj", IN, HEAD, "vd"),
        value=Part(KV, OUT, KV_GROUP, "vd", start="nope", outer="nope + vd"),
        moved=(Part(query, OUT, HEAD, "hd"), Part(KV, OUT, KV_GROUP, "nope", outer="nope + vd")),
    )


FAMILY = Family(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    attention=(_attention("self_attn.q_b_proj"), _attention("self_attn.q_proj")),
    ffn=(LLAMA_FFN, separate_ffn("mlp.shared_experts")),
    experts=("mlp.experts",),
    symbols=deepseek_symbols,
)
