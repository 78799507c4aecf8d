"""What one S2FT adapter costs on a real model: trainable parameters, file size, and the bytes one adapted
layer saves for backward next to the same layer under plain autograd.

    python benchmarks/layer_footprint.py [--model smollm2-135m] [--batch 4] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import peft_s2ft
from peft_s2ft.selection import count_parameters
from peft_s2ft.train.embedded_model import resolve_model


def saved_bytes(forward) -> int:
    """Bytes of the distinct storages autograd packs for backward during `forward()`."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(storages.values())


def layer_rows(layer: peft_s2ft.S2FTLayer, x: torch.Tensor) -> dict[str, int]:
    """Saved bytes beyond the frozen weight, for the S2FT layer and the same linear under plain autograd."""
    base = layer.get_base_layer()
    weight_bytes = base.weight.numel() * base.weight.element_size()
    trainable = copy.deepcopy(base).requires_grad_(True)
    return {
        "frozen linear (no weight grad)": saved_bytes(lambda: base(x)) - weight_bytes,
        "plain autograd, weight trainable": saved_bytes(lambda: trainable(x)) - weight_bytes,
        "S2FT layer": saved_bytes(lambda: layer(x)) - weight_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()

    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model))
    total = count_parameters(model)
    peft_model = get_peft_model(model, peft_s2ft.S2FTConfig(task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder)
        file_bytes = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
    print(f"model {args.model}: {total:,} parameters")
    print(f"default S2FTConfig: {trainable:,} trainable ({100 * trainable / total:.3f}%)")
    print(f"adapter_model.safetensors: {file_bytes:,} bytes ({file_bytes / (4 * trainable):.4f} x 4 bytes/param)")

    layer0 = peft_model.base_model.model.model.layers[0]
    for name, layer in (("o_proj", layer0.self_attn.o_proj), ("down_proj", layer0.mlp.down_proj)):
        selected = len(next(iter(layer.s2ft_indices.values())))
        x = torch.randn(args.batch, args.seq_len, layer.in_features, requires_grad=True)
        print(
            f"\nlayer 0 {name}: {selected} of {layer.in_features} input columns trained, "
            f"input {args.batch}x{args.seq_len}x{layer.in_features}; saved for backward beyond the weight:"
        )
        rows = layer_rows(layer, x)
        full = rows["plain autograd, weight trainable"]
        for label, value in rows.items():
            print(f"  {label:34s} {value:>12,} bytes  ({value / full:.4f} of plain autograd)")


if __name__ == "__main__":
    main()
