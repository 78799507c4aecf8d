"""Mixtral and Qwen3-MoE: Llama attention; every FFN is fused experts (`mlp.gate` is the router, not a gate
projection). Qwen3-MoE layers listed in `mlp_only_layers` are dense Llama FFNs."""

from .description import Family
from .layouts import LLAMA_ATTENTION, LLAMA_FFN

FAMILY = Family(
    name="mixtral",
    model_types=("mixtral", "qwen3_moe"),
    attention=(LLAMA_ATTENTION,),
    ffn=(LLAMA_FFN,),
    experts=("mlp.experts",),
)
