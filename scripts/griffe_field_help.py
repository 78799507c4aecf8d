"""A griffe extension for the API reference: a dataclass field's `metadata={"help": ...}` becomes its docstring.

S2FTConfig and PaCAConfig document their fields the way PEFT's configs do, in `field(metadata={"help": ...})`, which
griffe does not read. This reads the help text from the source (static analysis, nothing is imported) so the
reference shows the same text as the code, for fields that have no docstring of their own.
"""

from __future__ import annotations

import ast
from typing import Any

import griffe


def _help_text(call: ast.expr | None) -> str | None:
    """The constant string under "help" in `field(..., metadata={"help": "..."})`, else None."""
    if not isinstance(call, ast.Call) or getattr(call.func, "id", getattr(call.func, "attr", None)) != "field":
        return None
    for keyword in call.keywords:
        if keyword.arg == "metadata" and isinstance(keyword.value, ast.Dict):
            for key, value in zip(keyword.value.keys, keyword.value.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "help" and isinstance(value, ast.Constant):
                    return value.value if isinstance(value.value, str) else None
    return None


class FieldHelp(griffe.Extension):
    """Sets the docstring of class attributes declared as `name: type = field(metadata={"help": ...})`."""

    def on_attribute_instance(
        self, *, node: ast.AST | griffe.ObjectNode, attr: griffe.Attribute, **kwargs: Any
    ) -> None:
        if attr.docstring is not None or not isinstance(node, ast.AnnAssign):
            return
        text = _help_text(node.value)
        if text:
            attr.docstring = griffe.Docstring(text, lineno=node.lineno, endlineno=node.end_lineno, parent=attr)
