"""GPT-J: separate q/k/v (no bias) and `out_proj`; `fc_in` -> `fc_out`, attention and MLP in parallel."""

from .description import Family
from .layouts import separate_attention, separate_ffn

FAMILY = Family(
    name="gptj",
    model_types=("gptj",),
    attention=(separate_attention("attn", o="out_proj"),),
    ffn=(separate_ffn("mlp", up="fc_in", down="fc_out", gate=None),),
)
