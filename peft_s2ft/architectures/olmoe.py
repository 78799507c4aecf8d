"""OLMoE: OLMo2-style q/k norms over the whole projection (they move with heads) and fused experts."""

from .description import Family
from .layouts import separate_attention
from .olmo2 import NORMS

FAMILY = Family(
    name="olmoe",
    model_types=("olmoe",),
    attention=(separate_attention("self_attn", moved=NORMS),),
    ffn=(),
    experts=("mlp.experts",),
)
