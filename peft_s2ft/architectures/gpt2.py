"""GPT-2: `Conv1D` layers (weights stored (in, out)); `c_attn` fuses [Q | K | V]; `c_proj` names both outputs.

Paths are relative to the block (`attn.c_proj` versus `mlp.c_proj`), so the shared leaf name is not ambiguous.
"""

from .description import CHANNEL, HEAD, IN, KV_GROUP, OUT, AttentionLayout, Family, FFNLayout, Part

FAMILY = Family(
    name="gpt2",
    model_types=("gpt2",),
    attention=(
        AttentionLayout(
            output=Part("attn.c_proj", IN, HEAD, "vd"),
            value=Part("attn.c_attn", OUT, KV_GROUP, "vd", start="q + kv"),
            moved=(Part("attn.c_attn", OUT, HEAD, "hd"), Part("attn.c_attn", OUT, KV_GROUP, "hd", start="q")),
        ),
    ),
    ffn=(FFNLayout(down=Part("mlp.c_proj", IN, CHANNEL, 1), up=Part("mlp.c_fc", OUT, CHANNEL, 1)),),
)
