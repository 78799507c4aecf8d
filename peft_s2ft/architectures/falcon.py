"""Falcon: one fused `query_key_value` in three layouts, all "per K/V group: G query heads, then K, then V".

The new decoder architecture has nKV = num_kv_heads groups; multi-query (the default) is one group of all heads;
plain multi-head attention is nH groups of one head ([q_h; k_h; v_h], as GPT-NeoX). With `alibi`, per-head
position slopes depend on the head index: permute mode is refused.
"""

from .description import HEAD, IN, KV_GROUP, OUT, AttentionLayout, Family, Part, default_symbols, geometry
from .layouts import separate_ffn

QKV = "self_attention.query_key_value"
GROUP = "(G + 2) * hd"


def falcon_symbols(config) -> dict[str, int]:
    base = default_symbols(config)
    heads = base["nH"]
    if config.new_decoder_architecture:
        kv_heads = config.num_kv_heads
    elif config.multi_query:
        kv_heads = 1
    else:
        kv_heads = heads
    return geometry(heads, kv_heads, base["hd"])


FAMILY = Family(
    name="falcon",
    model_types=("falcon",),
    attention=(
        AttentionLayout(
            output=Part("self_attention.dense", IN, HEAD, "vd"),
            value=Part(QKV, OUT, KV_GROUP, "hd", start="(G + 1) * hd", outer=GROUP),
            moved=(
                Part(QKV, OUT, HEAD, "hd", per="G", outer=GROUP),
                Part(QKV, OUT, KV_GROUP, "hd", start="G * hd", outer=GROUP),
            ),
        ),
    ),
    ffn=(separate_ffn("mlp", up="dense_h_to_4h", down="dense_4h_to_h", gate=None),),
    symbols=falcon_symbols,
    order_sensitive=("alibi",),
)
