"""SORSA (Cao, 2024) as a baseline of the quality study: PiSSA's split with trainable singular values and an
orthonormal regulariser on the singular vectors.

A SORSA layer is W = W_res + U diag(s) V^T with W_res frozen and U, s, V trained, where U diag(s) V^T starts as
the top-r part of W's SVD; the training loss gains gamma * (||U^T U - I||_F + ||V^T V - I||_F) per layer, which
keeps U and V near-orthonormal so that the scaling is learnt in s. It is built on PEFT's PiSSA (LoRA with
`init_lora_weights="pissa"`, which leaves W_res in the base layer and the principal part in lora_B @ lora_A):
`to_sorsa` re-factors that product exactly into lora_B = U, lora_A = V^T and a trainable `sorsa_s` that scales
lora_B's input. It is a baseline for `benchmarks/quality.py`, not a feature of the library.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer

SINGULAR_VALUES = "sorsa_s"


def _scale_by_singular_values(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0] * getattr(module, SINGULAR_VALUES).to(args[0].dtype), *args[1:])


@torch.no_grad()
def to_sorsa(model: nn.Module, adapter_name: str = "default") -> int:
    """Turn every PiSSA-initialised LoRA layer of `model` into a SORSA layer with the same output; returns the
    number of layers converted. Raises if the model has none (a silent no-op would train plain PiSSA)."""
    from peft.tuners.lora import LoraLayer

    converted = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        lora_a, lora_b = module.lora_A[adapter_name], module.lora_B[adapter_name]
        scaling = module.scaling[adapter_name]
        principal = scaling * (lora_b.weight.double() @ lora_a.weight.double())  # (out, in), rank r
        rank = lora_a.weight.shape[0]
        u, s, vh = torch.linalg.svd(principal, full_matrices=False)
        dtype = lora_a.weight.dtype
        lora_a.weight.copy_(vh[:rank].to(dtype))
        lora_b.weight.copy_(u[:, :rank].to(dtype))
        lora_b.register_parameter(SINGULAR_VALUES, nn.Parameter((s[:rank] / scaling).to(dtype)))
        lora_b.register_forward_pre_hook(_scale_by_singular_values)
        converted += 1
    if not converted:
        raise ValueError(f"to_sorsa: the model has no LoRA layer with adapter {adapter_name!r} to convert.")
    return converted


def orthonormal_penalty(model: nn.Module) -> torch.Tensor:
    """Sum over SORSA layers of ||U^T U - I||_F + ||V V^T - I||_F (V^T is lora_A's (r, in) weight)."""
    from peft.tuners.lora import LoraLayer

    terms = []
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, lora_b in module.lora_B.items():
            if not hasattr(lora_b, SINGULAR_VALUES):
                continue
            u, vt = lora_b.weight, module.lora_A[name].weight
            eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
            terms.append(torch.linalg.matrix_norm(u.T @ u - eye) + torch.linalg.matrix_norm(vt @ vt.T - eye))
    if not terms:
        raise ValueError("orthonormal_penalty: the model has no SORSA layer (call to_sorsa first).")
    return torch.stack(terms).sum()


def sorsa_trainer(gamma: float) -> type[Trainer]:
    """A Trainer whose loss is the task loss plus gamma times the orthonormal penalty."""

    class SorsaTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):  # noqa: ANN001 - Trainer's signature
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
            loss = loss + gamma * orthonormal_penalty(model)
            return (loss, outputs) if return_outputs else loss

    return SorsaTrainer
