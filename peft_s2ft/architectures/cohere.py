"""Cohere: Llama names; with `use_qk_norm`, LayerNorm weights of shape [nH, hd] / [nKV, hd] move with heads."""

from .description import HEAD, KV_GROUP, PARAM, Family, Part
from .layouts import LLAMA_FFN, separate_attention

NORMS = (Part("self_attn.q_norm", PARAM, HEAD, 1), Part("self_attn.k_norm", PARAM, KV_GROUP, 1))

FAMILY = Family(
    name="cohere",
    model_types=("cohere",),
    attention=(separate_attention("self_attn", moved=NORMS, optional=("self_attn.q_norm", "self_attn.k_norm")),),
    ffn=(LLAMA_FFN,),
)
