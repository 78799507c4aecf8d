"""Phi-3 and Phi-4: fused `qkv_proj` rows [Q | K | V] and `gate_up_proj` rows [gate | up], concatenated."""

from .description import CHANNEL, HEAD, IN, KV_GROUP, OUT, AttentionLayout, Family, FFNLayout, Part

FAMILY = Family(
    name="phi3",
    model_types=("phi3",),
    attention=(
        AttentionLayout(
            output=Part("self_attn.o_proj", IN, HEAD, "vd"),
            value=Part("self_attn.qkv_proj", OUT, KV_GROUP, "vd", start="q + kv"),
            moved=(
                Part("self_attn.qkv_proj", OUT, HEAD, "hd"),
                Part("self_attn.qkv_proj", OUT, KV_GROUP, "hd", start="q"),
            ),
        ),
    ),
    ffn=(
        FFNLayout(
            down=Part("mlp.down_proj", IN, CHANNEL, 1),
            up=Part("mlp.gate_up_proj", OUT, CHANNEL, 1, start="I"),
            moved=(Part("mlp.gate_up_proj", OUT, CHANNEL, 1),),
        ),
    ),
)
