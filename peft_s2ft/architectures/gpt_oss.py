"""GPT-OSS: q/k/v/o with biases, one attention sink per query head (`self_attn.sinks`, moves with its head);
experts stored (in, out) with interleaved gate/up (gate = column 2c, up = 2c + 1) and biases; router `mlp.router`."""

from .description import HEAD, PARAM, Family, Part
from .layouts import separate_attention

FAMILY = Family(
    name="gpt_oss",
    model_types=("gpt_oss",),
    attention=(separate_attention("self_attn", moved=(Part("self_attn.sinks", PARAM, HEAD, 1),)),),
    ffn=(),
    experts=("mlp.experts",),
)
