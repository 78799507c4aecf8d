"""From a family's description to a model's structure: every block, with each unit's positions in each tensor.

The description is checked against the model: every part must exist, and the parts on one axis of one tensor
must tile it exactly (each position belongs to exactly one unit). A wrong head count, a fused layout read the
wrong way or a forgotten tensor is an error here, not a silently wrong permutation later.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..linear_like import features, is_linear_like
from ..partitioned import full_shape
from .description import CHANNEL, HEAD, KV_GROUP, OUT, PARAM, AttentionLayout, Family, FFNLayout, Part, evaluate
from .registry import FAMILIES, SUPPORTED_MODEL_TYPES

# The roles a block's trained tensors play, and the config flag that asks for the optional ones.
OUTPUT, VALUE, DOWN, UP, EXPERTS = "output", "value", "down", "up", "experts"
ROLE_FLAGS = {VALUE: "train_v", UP: "train_up"}


class UnsupportedModelError(ValueError):
    pass


def base_layer_of(module: nn.Module) -> nn.Module:
    """The module itself, or the layer a PEFT tuner layer (of any method) wraps."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


@dataclass(frozen=True)
class Span:
    """A part resolved for one layer: the absolute path and integer sizes."""

    path: str
    side: str
    unit: str
    width: int
    start: int
    outer: int
    per: int
    inner: int

    def positions(self, units: torch.Tensor | list[int]) -> torch.Tensor:
        """The positions of `units`, unit by unit, each unit's `width` positions in order."""
        units = torch.as_tensor(units, dtype=torch.long)
        first = self.start + (units // self.per) * self.outer + (units % self.per) * self.inner
        return (first[:, None] + torch.arange(self.width)).reshape(-1)

    @property
    def axis(self) -> str:
        """COLUMNS ("in") or ROWS ("out") of the layer's (out, in) weight, as partial_backprop names them."""
        return self.side


@dataclass(frozen=True)
class Block:
    """One attention or FFN block of one layer."""

    kind: str  # "attention" or "ffn"
    layer: int
    key: str  # path of the module whose input columns S2FT trains (O or down): the block's name
    num_units: int  # query heads (attention) or channels (FFN)
    num_groups: int  # K/V groups (attention); the channels again for an FFN
    trained: dict[str, Span]  # role -> span: output and value (attention), down and up (FFN)
    moved: tuple[Span, ...]  # every span that depends on a unit's position, the trained ones included

    @property
    def group_size(self) -> int:
        return self.num_units // self.num_groups

    @property
    def unit_name(self) -> str:
        return "heads" if self.kind == "attention" else "channels"


@dataclass(frozen=True)
class ExpertsBlock:
    """Fused mixture-of-experts parameters of one layer: a unit is (expert, channel). The index maps of the
    fused `gate_up_proj` / `down_proj` come from the module itself (experts.ExpertsLayout)."""

    layer: int
    key: str  # path of the experts module
    num_experts: int
    hidden_size: int
    num_channels: int
    transposed: bool  # down_proj stored [E, I, H] (GPT-OSS, Llama 4) rather than [E, H, I]
    kind: str = "experts"


@dataclass(frozen=True)
class ModelStructure:
    family: Family
    attention: tuple[Block, ...]
    ffn: tuple[Block, ...]
    experts: tuple[ExpertsBlock, ...] = ()
    symbols: dict[str, int] = field(default_factory=dict)

    def geometry(self) -> dict:
        """What an adapter's indices mean on this model: its family, head geometry, FFN and expert sizes.

        Saved in the adapter config; a file is refused on a base model whose geometry differs (where LoRA's
        tensor shapes would differ, S2FT's index lists may still fit and would silently mean other units).
        """
        return {
            "family": self.family.name,
            **{key: self.symbols[key] for key in ("nH", "nKV", "hd", "vd") if key in self.symbols},
            "ffn_widths": sorted({block.num_units for block in self.ffn}),
            "experts": sorted({(block.num_experts, block.num_channels) for block in self.experts}),
        }

    @property
    def blocks(self) -> tuple[Block, ...]:
        return self.attention + self.ffn

    def trainable_paths(self) -> dict[str, tuple[Block | ExpertsBlock, str]]:
        """Module path -> (block, role) for every module S2FT can train."""
        paths = {span.path: (block, role) for block in self.blocks for role, span in block.trained.items()}
        return paths | {block.key: (block, EXPERTS) for block in self.experts}


def text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError("S2FT needs a transformers model with a `config` (head counts and sizes).")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"S2FT has no description of model type '{model_type}'. Described are: {', '.join(SUPPORTED_MODEL_TYPES)}. "
        "A family is a few declarative lines in peft_s2ft/architectures (see description.py)."
    )


_LAYER = re.compile(r"(^|\.)\d+$")


def _lookup(modules: dict[str, nn.Module], path: str) -> nn.Module | nn.Parameter | None:
    """The module at `path` (through tuner wrappers), or a parameter of its parent, or None."""
    if path in modules:
        return base_layer_of(modules[path])
    parent, _, name = path.rpartition(".")
    owner = modules.get(parent)
    found = None if owner is None else getattr(base_layer_of(owner), name, None)
    return found if isinstance(found, nn.Parameter) else None


def _sizes_along(found: nn.Module | nn.Parameter, side: str, where: str) -> list[int]:
    """The length of every tensor axis a part on `side` of `found` indexes."""
    if side == PARAM:
        if isinstance(found, nn.Parameter):
            return [full_shape(found)[0]]
        return [full_shape(p)[0] for p in found.parameters(recurse=False)]
    if not is_linear_like(found):
        raise UnsupportedModelError(f"S2FT expected a linear layer at '{where}', found {type(found).__name__}.")
    out_features, in_features = features(found)
    return [out_features if side == OUT else in_features]


def _resolve(part: Part, layer_path: str, symbols: dict[str, int]) -> Span:
    width = evaluate(part.width, symbols)
    outer = evaluate(part.outer, symbols)
    inner = evaluate(part.inner, symbols)
    return Span(
        path=f"{layer_path}.{part.path}" if layer_path else part.path,
        side=part.side,
        unit=part.unit,
        width=width,
        start=evaluate(part.start, symbols),
        outer=width if outer is None else outer,
        per=evaluate(part.per, symbols),
        inner=width if inner is None else inner,
    )


def _check_tiling(spans: list[Span], counts: dict[str, int], modules, family: Family, symbols) -> None:
    """Parts on one axis of one tensor must cover it exactly, each position once."""
    by_axis: dict[tuple[str, str], list[Span]] = {}
    for span in spans:
        by_axis.setdefault((span.path, span.side), []).append(span)
    for (path, side), group in by_axis.items():
        found = _lookup(modules, path)
        positions = torch.cat([span.positions(torch.arange(counts[span.unit])) for span in group])
        for size in _sizes_along(found, side, path):
            inside = positions[(positions >= 0) & (positions < size)]
            covered = int((torch.bincount(inside, minlength=size) > 0).sum())
            if len(positions) != size or len(inside) != size or covered != size:
                shown = {k: symbols[k] for k in ("nH", "nKV", "hd", "vd") if k in symbols}
                raise UnsupportedModelError(
                    f"S2FT's '{family.name}' description does not fit '{path}': its {side} axis has {size} positions, "
                    f"but the described parts cover {covered} of them (geometry from the config: {shown}). The "
                    "config and the weights disagree, or this variant of the family is not described."
                )


def _missing(parts: tuple[Part, ...], layer_path: str, modules, optional: tuple[str, ...] = ()) -> list[str]:
    return [
        part.path
        for part in parts
        if part.path not in optional
        and _lookup(modules, f"{layer_path}.{part.path}" if layer_path else part.path) is None
    ]


def _attention_block(layout: AttentionLayout, layer_path, index, modules, family, symbols) -> Block:
    parts = [layout.output, layout.value, *layout.moved]
    present = [p for p in parts if p.path not in layout.optional or _lookup(modules, f"{layer_path}.{p.path}")]
    spans = [_resolve(p, layer_path, symbols) for p in present]
    counts = {HEAD: symbols["nH"], KV_GROUP: symbols["nKV"]}
    _check_tiling(spans, counts, modules, family, symbols)
    return Block(
        kind="attention",
        layer=index,
        key=spans[0].path,
        num_units=symbols["nH"],
        num_groups=symbols["nKV"],
        trained={OUTPUT: spans[0], VALUE: spans[1]},
        moved=tuple(spans),
    )


def _ffn_block(layout: FFNLayout, layer_path, index, modules, family, symbols) -> Block:
    down_path = f"{layer_path}.{layout.down.path}" if layer_path else layout.down.path
    down = _lookup(modules, down_path)
    _, channels = features(down)
    symbols = {**symbols, "I": channels}
    spans = [_resolve(p, layer_path, symbols) for p in (layout.down, layout.up, *layout.moved)]
    _check_tiling(spans, {CHANNEL: channels}, modules, family, symbols)
    return Block(
        kind="ffn",
        layer=index,
        key=spans[0].path,
        num_units=channels,
        num_groups=channels,
        trained={DOWN: spans[0], UP: spans[1]},
        moved=tuple(spans),
    )


def _experts_block(path: str, index: int, module: nn.Module) -> ExpertsBlock:
    from ..experts import ExpertsLayout

    try:
        layout = ExpertsLayout.from_module(module)
        num_experts, hidden, channels = layout.dims(module)
    except TypeError as error:
        raise UnsupportedModelError(f"S2FT cannot train the experts at '{path}': {error}") from error
    return ExpertsBlock(index, path, num_experts, hidden, channels, layout.transposed)


def _text_model_path(model: nn.Module, config) -> str:
    """ "" for a text model; for a multimodal wrapper, the path of its sub-model configured by the text config."""
    if getattr(model, "config", None) is config:
        return ""
    for path, module in model.named_modules():
        if path and getattr(module, "config", None) is config and hasattr(module, "get_input_embeddings"):
            return path
    raise UnsupportedModelError(
        f"S2FT found no sub-model of {type(model).__name__} configured by its text config: it trains the text decoder "
        "of multimodal models, and could not tell which modules belong to it. Apply it to the text model itself."
    )


def describe(model: nn.Module) -> ModelStructure:
    """Every attention, FFN and experts block of `model`, checked against its family's description."""
    config = text_config(model)
    family = family_of(config)
    symbols = family.symbols(config)
    modules = dict(model.named_modules())
    root = _text_model_path(model, config)
    attention, ffn, experts = [], [], []
    for layer_path in modules:
        if not _LAYER.search(layer_path) or ".base_layer" in layer_path:
            continue
        if root and not layer_path.startswith(root + "."):
            continue  # a vision tower or another sub-model: its geometry is not the text config's
        index = int(layer_path.rpartition(".")[2])

        def exists(relative: str, layer_path=layer_path) -> bool:
            return _lookup(modules, f"{layer_path}.{relative}") is not None

        candidates = [lay for lay in family.attention if exists(lay.output.path)]
        if candidates:
            fitting = [
                lay for lay in candidates if not _missing((lay.value, *lay.moved), layer_path, modules, lay.optional)
            ]
            if not fitting:
                missing = _missing(
                    (candidates[0].value, *candidates[0].moved), layer_path, modules, candidates[0].optional
                )
                raise UnsupportedModelError(
                    f"S2FT's '{family.name}' description expects {missing} under '{layer_path}', which it lacks."
                )
            attention.append(_attention_block(fitting[0], layer_path, index, modules, family, symbols))
        for layout in family.ffn:
            if exists(layout.down.path):
                missing = _missing((layout.up, *layout.moved), layer_path, modules)
                if missing:
                    raise UnsupportedModelError(
                        f"S2FT's '{family.name}' description expects {missing} under '{layer_path}', which it lacks."
                    )
                ffn.append(_ffn_block(layout, layer_path, index, modules, family, symbols))
        for relative in family.experts:
            if exists(relative):
                path = f"{layer_path}.{relative}"
                experts.append(_experts_block(path, index, base_layer_of(modules[path])))
    if not attention and not ffn and not experts:
        raise UnsupportedModelError(
            f"S2FT found no layer of the '{family.name}' family's layout in {type(model).__name__} (looked for "
            f"{[lay.output.path for lay in family.attention]} under numbered layers)."
        )
    return ModelStructure(family, tuple(attention), tuple(ffn), tuple(experts), symbols)
