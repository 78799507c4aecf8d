"""A config or call that S2FT cannot honour raises, saying why; none silently trains or does nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from peft_s2ft import S2FTConfig
from tests.snapshots import assert_same_snapshot, model_snapshot


def _trainable(model) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_modules": "all-linear"}, "all-linear' has no meaning for S2FT"),
        ({"target_modules": ["v_proj"]}, r"names 'self_attn\.v_proj' \(value rows\) but train_v=False"),
        ({"target_modules": ["o_proj"], "train_v": True}, r"train_v=True, but target_modules=\['o_proj'\]"),
        ({"target_modules": ["down_proj"], "train_up": True}, "does not name 'mlp.up_proj'"),
        ({"layers_to_transform": [7]}, "nothing to train"),
        ({"exclude_modules": r".*(o_proj|down_proj)"}, "nothing to train"),
        ({"target_modules": ["q_proj"]}, "contains 'q_proj', which is not a module S2FT trains"),
        ({"target_modules": r".*\.o_proj", "train_up": True}, "train_up=True, but target_modules=.* does not name"),
        ({"target_modules": r".*\.(o|v)_proj"}, r"names 'self_attn\.v_proj' \(value rows\) but train_v=False"),
        ({"target_modules": ["o_proj"], "channels_per_layer": 8}, "sets channels_per_layer/channel_ratio but"),
        ({"target_modules": ["down_proj"], "heads_per_layer": 2}, "sets heads_per_layer/head_ratio but"),
        ({"target_modules": ["o_proj", "down_proj"], "attention_share": 0.0}, "selects no heads"),
        ({"target_modules": ["o_proj", "down_proj"], "attention_share": 1.0}, "selects no channels"),
        ({"target_modules": r".*\.q_proj"}, "names no module S2FT trains"),
    ],
)
def test_a_config_that_would_train_nothing_or_ignore_a_flag_raises(load, kwargs, message):
    model = load("llama-gqa")
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, S2FTConfig(task_type="CAUSAL_LM", **kwargs))
    assert_same_snapshot(before, model_snapshot(model))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"train_v": True, "heads_per_layer": 0}, "train_v"),
        ({"train_v": True, "attention_share": 0.0}, "train_v"),
        ({"train_up": True, "channels_per_layer": 0}, "train_up"),
    ],
)
def test_row_training_without_units_to_select_fails_at_construction(kwargs, field):
    with pytest.raises(ValueError, match=rf"S2FTConfig\.{field}="):
        S2FTConfig(**kwargs)


@pytest.mark.parametrize(("target", "flag"), [("v_proj", "train_v"), ("up_proj", "train_up")])
def test_only_the_row_projection_trains_what_the_user_asked(load, input_ids, target, flag):
    model = get_peft_model(
        load("llama-gqa"), S2FTConfig(task_type="CAUSAL_LM", target_modules=[target], **{flag: True})
    )
    trainable = _trainable(model)
    assert trainable and all(f"{target}.s2ft_delta" in name for name in trainable)
    model(input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("permute", [False, True])
def test_an_unfrozen_base_weight_gets_its_gradient(load, input_ids, permute):
    model = get_peft_model(load("llama-mha"), S2FTConfig(task_type="CAUSAL_LM", init_weights=False, permute=permute))
    layer = model.base_model.model.model.layers[0].self_attn.o_proj
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(2, 5, layer.in_features)
    y = torch.randn(2, 5, layer.out_features)
    (layer(x) * y).sum().backward()

    weight = layer.base_layer.weight.detach().clone().requires_grad_(True)
    where = slice(*layer.block_range) if permute else layer.s2ft_indices["default"]
    delta = torch.zeros_like(weight)
    delta[:, where] = layer.s2ft_delta["default"].detach()
    (F.linear(x, weight + delta) * y).sum().backward()
    torch.testing.assert_close(layer.base_layer.weight.grad, weight.grad)
