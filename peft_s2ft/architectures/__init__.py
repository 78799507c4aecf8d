"""Architecture descriptions: one small module per family, each a few declarative lines (see description.py)."""

from __future__ import annotations

from .description import Family
from .discovery import (
    DOWN,
    EXPERTS,
    OUTPUT,
    ROLE_FLAGS,
    UP,
    VALUE,
    Block,
    ExpertsBlock,
    ModelStructure,
    Span,
    UnsupportedModelError,
    describe,
    family_of,
)
from .registry import FAMILIES, SUPPORTED_MODEL_TYPES

__all__ = [
    "DOWN",
    "EXPERTS",
    "FAMILIES",
    "OUTPUT",
    "ROLE_FLAGS",
    "SUPPORTED_MODEL_TYPES",
    "UP",
    "VALUE",
    "Block",
    "ExpertsBlock",
    "Family",
    "ModelStructure",
    "Span",
    "UnsupportedModelError",
    "describe",
    "family_of",
]
