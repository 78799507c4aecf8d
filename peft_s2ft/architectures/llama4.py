"""Llama 4 (text): Llama attention (its qk norm has no weight); the FFN child is `feed_forward`, dense in some
layers, experts plus a dense `shared_expert` in the others."""

from .description import Family
from .layouts import LLAMA_ATTENTION, separate_ffn

FAMILY = Family(
    name="llama4",
    model_types=("llama4_text",),
    attention=(LLAMA_ATTENTION,),
    ffn=(separate_ffn("feed_forward"), separate_ffn("feed_forward.shared_expert")),
    experts=("feed_forward.experts",),
)
