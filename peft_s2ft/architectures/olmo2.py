"""OLMo2: Llama names, with q/k norms over the whole projection ([nH * hd], [nKV * hd]): they move with heads."""

from .description import HEAD, KV_GROUP, PARAM, Family, Part
from .layouts import LLAMA_FFN, separate_attention

NORMS = (Part("self_attn.q_norm", PARAM, HEAD, "hd"), Part("self_attn.k_norm", PARAM, KV_GROUP, "hd"))

FAMILY = Family(
    name="olmo2",
    model_types=("olmo2",),
    attention=(separate_attention("self_attn", moved=NORMS),),
    ffn=(LLAMA_FFN,),
)
