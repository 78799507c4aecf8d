"""Everything about a model that a refused load or a failed injection must leave as it was."""

from __future__ import annotations

import torch
from torch import nn

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def model_snapshot(model: nn.Module) -> dict:
    return {
        "modules": {name: type(module) for name, module in model.named_modules()},
        "hooks": {
            name: tuple(len(getattr(module, attr, {})) for attr in HOOK_DICTS) for name, module in model.named_modules()
        },
        "tensors": {name: t.detach().clone() for name, t in model.state_dict(keep_vars=True).items()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "attributes": {name: hasattr(model, name) for name in ("peft_config", "_load_pretrained_model")}
        | {"_hf_peft_config_loaded": getattr(model, "_hf_peft_config_loaded", None)},
        "instance_dict": sorted(k for k in vars(model) if not k.startswith("_modules")),
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    for part in ("modules", "hooks", "requires_grad", "attributes", "instance_dict"):
        assert before[part] == after[part], part
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(value, after["tensors"][key]), key
