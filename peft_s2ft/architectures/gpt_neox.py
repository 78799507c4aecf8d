"""GPT-NeoX / Pythia: `query_key_value` rows interleaved per head, [q_h; k_h; v_h] blocks of 3 * hd."""

from .description import HEAD, IN, KV_GROUP, OUT, AttentionLayout, Family, Part
from .layouts import separate_ffn

QKV = "attention.query_key_value"

FAMILY = Family(
    name="gpt_neox",
    model_types=("gpt_neox",),
    attention=(
        AttentionLayout(
            output=Part("attention.dense", IN, HEAD, "vd"),
            value=Part(QKV, OUT, KV_GROUP, "hd", start="2 * hd", outer="3 * hd"),
            moved=(
                Part(QKV, OUT, HEAD, "hd", outer="3 * hd"),
                Part(QKV, OUT, KV_GROUP, "hd", start="hd", outer="3 * hd"),
            ),
        ),
    ),
    ffn=(separate_ffn("mlp", up="dense_h_to_4h", down="dense_4h_to_h", gate=None),),
)
