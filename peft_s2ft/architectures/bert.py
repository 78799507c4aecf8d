"""BERT and RoBERTa encoders: `attention.self.{query,key,value}`, O = `attention.output.dense`, FFN
`intermediate.dense` -> `output.dense` (the leaf name `dense` is told apart by its path in the layer)."""

from .description import Family
from .layouts import separate_attention, separate_ffn

FAMILY = Family(
    name="bert",
    model_types=("bert", "roberta"),
    attention=(separate_attention("attention", q="self.query", k="self.key", v="self.value", o="output.dense"),),
    ffn=(separate_ffn("", up="intermediate.dense", down="output.dense", gate=None),),
)
