"""Qwen2-MoE: Llama attention with q/k/v biases; experts plus a dense `shared_expert` (its scalar
`shared_expert_gate` does not depend on channel order); layers in `mlp_only_layers` are dense."""

from .description import Family
from .layouts import LLAMA_ATTENTION, LLAMA_FFN, separate_ffn

FAMILY = Family(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    attention=(LLAMA_ATTENTION,),
    ffn=(LLAMA_FFN, separate_ffn("mlp.shared_expert")),
    experts=("mlp.experts",),
)
