"""Every described family; adding one is a module with its `FAMILY` and a line here."""

from __future__ import annotations

from . import (
    bert,
    cohere,
    deepseek_v3,
    falcon,
    gpt2,
    gpt_neox,
    gpt_oss,
    gptj,
    llama,
    llama4,
    mixtral,
    olmo2,
    olmoe,
    opt,
    phi3,
    qwen2_moe,
)
from .description import Family

FAMILIES: tuple[Family, ...] = (
    llama.FAMILY,
    olmo2.FAMILY,
    cohere.FAMILY,
    phi3.FAMILY,
    gpt2.FAMILY,
    gptj.FAMILY,
    gpt_neox.FAMILY,
    opt.FAMILY,
    falcon.FAMILY,
    bert.FAMILY,
    mixtral.FAMILY,
    qwen2_moe.FAMILY,
    olmoe.FAMILY,
    gpt_oss.FAMILY,
    llama4.FAMILY,
    deepseek_v3.FAMILY,
)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for family in FAMILIES for t in family.model_types)
