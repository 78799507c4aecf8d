"""The data model of an architecture: where each unit (a query head, a K/V group, an FFN channel) lives.

A family is described once, as data: per layer, which module paths hold attention and FFN tensors, and for every
tensor that depends on a unit's position, which slice of which axis belongs to unit u. Discovery, shape checks,
selection, the permutation and the checkpoint format are all derived from that description (see discovery.py).

Unit u's positions along an axis are

    start + (u // per) * outer + (u % per) * inner + [0, width)

which covers plain layouts (Q rows of head h: h * hd + [0, hd)), concatenated fusions (V inside Phi-3's
`qkv_proj`: start = q + kv), per-head interleaving (GPT-NeoX: outer = 3 * hd) and per-group interleaving (Falcon's
new decoder architecture: per = G query heads, outer = (G + 2) * hd). Sizes are integers or arithmetic over the
family's symbols (`nH`, `nKV`, `G`, `hd`, `vd`, `q`, `kv`, `I`, ...), evaluated for each layer.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

HEAD, KV_GROUP, CHANNEL = "head", "kv_group", "channel"
Unit = Literal["head", "kv_group", "channel"]

# Which part of a module a slice lives in. OUT: output rows of a linear-like module (its weight's rows and its
# bias); IN: input columns of a linear-like module; PARAM: dimension 0 of a parameter, or of every parameter of a
# module (a norm's weight and bias). Linear-like means nn.Linear or transformers' Conv1D (stored transposed).
OUT, IN, PARAM = "out", "in", "param"
Side = Literal["out", "in", "param"]

Size = int | str


@dataclass(frozen=True)
class Part:
    """Where unit u lives in one module or parameter, relative to its decoder (or encoder) layer."""

    path: str
    side: Side
    unit: Unit
    width: Size
    start: Size = 0
    outer: Size | None = None  # distance between consecutive units (or unit groups); defaults to `width`
    per: Size = 1  # units per group of a grouped interleaving
    inner: Size | None = None  # distance between units within a group; defaults to `width`


@dataclass(frozen=True)
class AttentionLayout:
    """Heads couple Q/K/V rows to O columns. `output` (O columns per head) is what S2FT trains; `value` (V rows per
    K/V group) is trained with `train_v`; `moved` are the other tensors that must move with their heads."""

    output: Part
    value: Part
    moved: tuple[Part, ...] = ()
    optional: tuple[str, ...] = ()  # paths of `moved` parts some configs of the family do not have (qk norms)


@dataclass(frozen=True)
class FFNLayout:
    """Channels couple Up/Gate rows to Down columns. `down` is trained; `up` is trained with `train_up`."""

    down: Part
    up: Part
    moved: tuple[Part, ...] = ()


Symbols = dict[str, int]


@dataclass(frozen=True)
class Family:
    """One architecture family: the layouts its layers may have, and how its config names the head geometry.

    Every attention layout whose `output` module exists in a layer is tried in order (the first whose modules all
    exist is used); every FFN layout whose `down` module exists is a block of its own (a MoE layer's shared expert
    beside its experts; dense and MoE layers mixed in one model).
    """

    name: str
    model_types: tuple[str, ...]
    attention: tuple[AttentionLayout, ...]
    ffn: tuple[FFNLayout, ...]
    symbols: Callable[[object], Symbols] = field(default=None)  # type: ignore[assignment]
    # Config attributes that, when true, make the model depend on head order (ALiBi slopes): no permute mode.
    order_sensitive: tuple[str, ...] = ()
    # Paths of fused mixture-of-experts modules (3-D `gate_up_proj` / `down_proj` parameters), relative to a layer.
    experts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.symbols is None:
            object.__setattr__(self, "symbols", default_symbols)


def _first(config, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def default_symbols(config) -> Symbols:
    """Head geometry under the names most configs use (`num_attention_heads` / `n_head`, optional K/V heads)."""
    heads = _first(config, ("num_attention_heads", "n_head", "num_heads"))
    if heads is None:
        raise ValueError(f"{type(config).__name__} names no number of attention heads (num_attention_heads, n_head).")
    kv_heads = _first(config, ("num_key_value_heads",)) or heads
    hidden = _first(config, ("hidden_size", "n_embd", "d_model"))
    head_dim = _first(config, ("head_dim",)) or hidden // heads
    return geometry(heads, kv_heads, head_dim)


def geometry(heads: int, kv_heads: int, head_dim: int, value_dim: int | None = None, **extra: int) -> Symbols:
    """The symbols layouts are written in: nH, nKV, G = nH / nKV, hd (Q/K head width), vd (V/O head width)."""
    if heads % kv_heads:
        raise ValueError(f"{heads} attention heads are not a multiple of {kv_heads} K/V heads.")
    value_dim = head_dim if value_dim is None else value_dim
    return {
        "nH": heads,
        "nKV": kv_heads,
        "G": heads // kv_heads,
        "hd": head_dim,
        "vd": value_dim,
        "q": heads * head_dim,
        "kv": kv_heads * head_dim,
        **extra,
    }


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def evaluate(size: Size | None, symbols: Symbols) -> int | None:
    """An integer, or integer arithmetic (+ - * // and parentheses) over `symbols`."""
    if size is None or isinstance(size, int):
        return size

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in symbols:
                raise KeyError(f"unknown symbol '{node.id}' in layout size '{size}' (known: {', '.join(symbols)})")
            return symbols[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"layout size '{size}' is not integer arithmetic over symbols")

    return value(ast.parse(size, mode="eval").body)
