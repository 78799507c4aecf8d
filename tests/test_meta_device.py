"""Building the PEFT model on the meta device (as FSDP and big-model loading do), then materializing it."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from peft import get_peft_model
from peft.utils import set_base_model_state_dict
from transformers import AutoConfig, AutoModelForCausalLM

from peft_s2ft import S2FTConfig
from tests.conftest import MODEL_NAMES


def _indices(model) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if "s2ft_indices" in n}


@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_random_selection_survives_to_empty_and_loading_the_weights(model_dirs, load, input_ids, name, permute):
    real = load(name)
    config = S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=2, channels_per_layer=3, seed=5, permute=permute)
    reference = get_peft_model(load(name), config)

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dirs[name]))
    model = get_peft_model(empty, S2FTConfig(**config.to_dict() | {"target_modules": None}))
    model.to_empty(device="cpu")
    set_base_model_state_dict(model, real.state_dict())  # the real base weights; the adapter is not in there
    inner = model.base_model.model
    with torch.no_grad():  # non-persistent buffers (rotary frequencies) are the user's to re-create, as usual
        for name, buffer in real.named_buffers():
            if name not in real.state_dict():
                inner.get_buffer(name).copy_(buffer)

    assert _indices(model).keys() == _indices(reference).keys()
    for key, value in _indices(reference).items():
        assert torch.equal(_indices(model)[key], value), key
    for delta in (p for n, p in model.named_parameters() if "s2ft_delta" in n):
        assert torch.equal(delta, torch.zeros_like(delta))  # init_weights=True: zero, not uninitialized memory
    model.eval()
    torch.testing.assert_close(model(input_ids).logits, real(input_ids).logits)


def test_weight_based_selection_on_meta_weights_says_what_to_do(model_dirs):
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dirs["llama-gqa"]))
    with pytest.raises(ValueError, match="weight_large.*meta device.*selection='random'"):
        get_peft_model(empty, S2FTConfig(task_type="CAUSAL_LM", selection="weight_large"))
