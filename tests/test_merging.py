"""Merging writes only the selected columns and unmerging restores them by copy: bit-exact in any number of cycles."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_s2ft import S2FTConfig

CYCLES = 5


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "s2ft_" not in n}


def _assert_bit_identical(model, weights) -> None:
    for name, param in model.named_parameters():
        if name in weights:
            assert torch.equal(param, weights[name]), name


@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_unmerge_cycles_are_bit_exact(load, input_ids, dtype, permute):
    config = S2FTConfig(task_type="CAUSAL_LM", permute=permute, init_weights=False, train_v=True)
    model = get_peft_model(load("qwen2-bias", dtype=dtype), config, autocast_adapter_dtype=False)
    weights = _base_weights(model)
    unmerged = model(input_ids).logits
    for _ in range(CYCLES):
        model.merge_adapter()
        merged = model(input_ids).logits
        model.unmerge_adapter()
        _assert_bit_identical(model, weights)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}
    torch.testing.assert_close(merged, unmerged, **tolerance)
    assert torch.equal(model(input_ids).logits, unmerged)


def test_overlapping_adapters_merged_together_unmerge_bit_exact(load, input_ids):
    model = get_peft_model(load("llama-gqa"), S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=0))
    model.add_adapter("other", S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=0, heads_per_layer=2))
    weights = _base_weights(model)
    overlap = [
        set(m.s2ft_indices["default"].tolist()) & set(m.s2ft_indices["other"].tolist())
        for m in model.modules()
        if hasattr(m, "s2ft_indices") and "other" in m.s2ft_indices
    ]
    assert any(overlap)  # the same columns are written by both merges
    model.base_model.set_adapter(["default", "other"])
    both = model(input_ids).logits
    for _ in range(CYCLES):
        model.merge_adapter(["default", "other"])
        torch.testing.assert_close(model(input_ids).logits, both, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        _assert_bit_identical(model, weights)


def test_switching_merged_adapters_restores_the_base_bit_for_bit(load, input_ids):
    model = get_peft_model(load("llama-gqa"), S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=0))
    model.add_adapter("other", S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=1))
    weights = _base_weights(model)
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = model(input_ids).logits
    for _ in range(CYCLES):
        for name in ("default", "other"):
            model.set_adapter(name)
            model.merge_adapter()
            torch.testing.assert_close(model(input_ids).logits, expected[name], atol=1e-5, rtol=1e-5)
            model.unmerge_adapter()
            _assert_bit_identical(model, weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_set_adapter_on_a_merged_model_switches_what_is_merged(load, input_ids, dtype, recwarn):
    model = get_peft_model(
        load("llama-gqa", dtype=dtype),
        S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=0),
        autocast_adapter_dtype=False,
    )
    model.add_adapter("other", S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=1, layers_to_transform=[1]))
    weights = _base_weights(model)
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = model(input_ids).logits
    model.set_adapter("default")
    model.merge_adapter()
    merged_states = {}
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}
    for _ in range(CYCLES):
        for name in ("other", "default"):
            model.set_adapter(name)
            layers = [m for m in model.modules() if hasattr(m, "merged_adapters") and name in m.s2ft_delta]
            assert layers and all(m.merged_adapters == [name] for m in layers)
            merged_states.setdefault(name, {k: p.detach().clone() for k, p in model.named_parameters()})
            for key, param in model.named_parameters():  # every switch writes the same bits
                assert torch.equal(param, merged_states[name][key]), key
            torch.testing.assert_close(model(input_ids).logits, expected[name], **tolerance)
    model.unmerge_adapter()
    _assert_bit_identical(model, weights)
    assert not [w for w in recwarn if "merged" in str(w.message).lower()]
