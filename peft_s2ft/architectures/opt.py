"""OPT: separate q/k/v/out projections with biases; `fc1` -> `fc2` directly on the decoder layer."""

from .description import Family
from .layouts import separate_attention, separate_ffn

FAMILY = Family(
    name="opt",
    model_types=("opt",),
    attention=(separate_attention("self_attn", o="out_proj"),),
    ffn=(separate_ffn("", up="fc1", down="fc2", gate=None),),
)
