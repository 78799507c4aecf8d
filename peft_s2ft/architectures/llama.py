"""Llama-shaped decoders: separate q/k/v/o and gate/up/down projections, nothing else per head.

Qwen3's and Gemma 3's q/k norms act over one head's width, shared by all heads: they do not move.
"""

from .description import Family
from .layouts import LLAMA_ATTENTION, LLAMA_FFN

FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"),
    attention=(LLAMA_ATTENTION,),
    ffn=(LLAMA_FFN,),
)
