"""Layouts shared by many families, so a family module only states what is particular to it."""

from __future__ import annotations

from .description import CHANNEL, HEAD, IN, KV_GROUP, OUT, AttentionLayout, FFNLayout, Part


def separate_attention(
    root: str,
    q: str = "q_proj",
    k: str = "k_proj",
    v: str = "v_proj",
    o: str = "o_proj",
    moved: tuple = (),
    optional=(),
) -> AttentionLayout:
    """Q, K, V and O as separate linear layers under `root` (Llama and most others)."""
    return AttentionLayout(
        output=Part(f"{root}.{o}", IN, HEAD, "vd"),
        value=Part(f"{root}.{v}", OUT, KV_GROUP, "vd"),
        moved=(Part(f"{root}.{q}", OUT, HEAD, "hd"), Part(f"{root}.{k}", OUT, KV_GROUP, "hd"), *moved),
        optional=tuple(optional),
    )


def separate_ffn(root: str, up: str = "up_proj", down: str = "down_proj", gate: str | None = "gate_proj") -> FFNLayout:
    """Up (and gate) and down as separate linear layers; `root` may be "" for layers that hold them directly."""
    prefix = f"{root}." if root else ""
    moved = (Part(f"{prefix}{gate}", OUT, CHANNEL, 1),) if gate else ()
    return FFNLayout(
        down=Part(f"{prefix}{down}", IN, CHANNEL, 1), up=Part(f"{prefix}{up}", OUT, CHANNEL, 1), moved=moved
    )


LLAMA_ATTENTION = separate_attention("self_attn")
LLAMA_FFN = separate_ffn("mlp")
