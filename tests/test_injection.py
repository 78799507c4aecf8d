"""Injection either succeeds completely or leaves the model exactly as it was, and refuses what it cannot do."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from safetensors.torch import load_file, save_file

from peft_s2ft import S2FTConfig, permutation
from peft_s2ft.layer import S2FTLayer
from tests.snapshots import assert_same_snapshot, model_snapshot


def _config(**kwargs):
    return S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=2, channels_per_layer=3, **kwargs)


@pytest.mark.parametrize(("lora_targets", "permute"), [(["o_proj"], False), (["down_proj"], True), (["q_proj"], True)])
def test_another_methods_layer_is_refused_before_anything_is_wrapped(load, lora_targets, permute):
    model = load("llama-gqa")
    inject_adapter_in_model(LoraConfig(target_modules=lora_targets), model, adapter_name="lora")
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="already a layer of another PEFT method.*does not stack"):
        inject_adapter_in_model(_config(permute=permute), model, adapter_name="s2ft")
    assert_same_snapshot(before, model_snapshot(model))


def test_default_mode_coexists_with_another_method_on_modules_it_does_not_touch(load, input_ids):
    model = load("llama-gqa")
    inject_adapter_in_model(LoraConfig(target_modules=["q_proj"], init_lora_weights=False), model, "lora")
    with_lora = model(input_ids).logits
    inject_adapter_in_model(_config(), model, adapter_name="s2ft")
    assert any(isinstance(m, S2FTLayer) for m in model.modules())
    torch.testing.assert_close(model(input_ids).logits, with_lora)  # a zero S2FT delta changes nothing


def test_a_failure_while_permuting_takes_everything_out_again(load, monkeypatch):
    model = load("llama-gqa")
    before = model_snapshot(model)

    def fail(*args, **kwargs):
        raise RuntimeError("simulated failure after the layers were wrapped")

    monkeypatch.setattr(permutation, "permute_model", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        get_peft_model(model, _config(permute=True))
    assert_same_snapshot(before, model_snapshot(model))


def _two_partial_groups(path):
    """Rewrite a saved llama-gqa adapter so layer 0's O block holds heads 0 and 2: one head of each K/V group."""
    tensors = load_file(path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.o_proj.s2ft_indices"))
    tensors[key] = torch.cat([torch.arange(0, 8), torch.arange(16, 24)])
    save_file(tensors, path / "adapter_model.safetensors")


@pytest.mark.parametrize("loader", ["PeftModel.from_pretrained", "transformers load_adapter"])
def test_a_permute_mode_load_that_cannot_be_made_contiguous_leaves_nothing_behind(load, tmp_path, loader):
    get_peft_model(load("llama-gqa"), _config(permute=True, init_weights=False)).save_pretrained(tmp_path)
    _two_partial_groups(tmp_path)
    model = load("llama-gqa")
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="partly selected K/V groups"):
        if loader == "PeftModel.from_pretrained":
            PeftModel.from_pretrained(model, tmp_path)
        else:
            model.load_adapter(str(tmp_path), adapter_name="loaded")
    assert_same_snapshot(before, model_snapshot(model))


def test_reloading_a_selection_that_cannot_be_made_contiguous_keeps_the_permute_mode_adapter(load, tmp_path):
    model = get_peft_model(load("llama-gqa"), _config(permute=True, init_weights=False))
    model.save_pretrained(tmp_path)
    _two_partial_groups(tmp_path)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="partly selected K/V groups"):
        model.load_adapter(tmp_path, adapter_name="default")  # over the existing adapter, as a resume does
    assert_same_snapshot(before, model_snapshot(model))


def _rewrite(path, edit):
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


def _key(tensors, suffix):
    return next(k for k in tensors if k.endswith(suffix))


def _up_rows_not_down_columns(t):
    down = t[_key(t, "layers.1.mlp.down_proj.s2ft_indices")]
    others = [c for c in range(48) if c not in set(down.tolist())]
    t[_key(t, "layers.1.mlp.up_proj.s2ft_indices")] = torch.tensor(others[: len(down)])


def _value_rows_of_another_group(t):
    heads = set((t[_key(t, "layers.0.self_attn.o_proj.s2ft_indices")] // 8).tolist())  # head_dim 8
    other = next(g for g in range(2) if not any(h // 2 == g for h in heads))  # group size 2
    t[_key(t, "layers.0.self_attn.v_proj.s2ft_indices")] = torch.arange(other * 8, other * 8 + 8)


def _columns_not_whole_heads(t):
    key = _key(t, "layers.0.self_attn.o_proj.s2ft_indices")
    t[key] = t[key] + 4  # half of one head and half of the next


UNCONTIGUOUS = {
    "up rows other than down columns": (dict(train_up=True), _up_rows_not_down_columns),
    "value rows outside the heads' groups": (dict(train_v=True), _value_rows_of_another_group),
    "columns that are not whole heads": ({}, _columns_not_whole_heads),
}


@pytest.mark.parametrize("loader", ["PeftModel.from_pretrained", "transformers load_adapter", "over the same name"])
@pytest.mark.parametrize("case", list(UNCONTIGUOUS))
def test_a_permute_mode_file_whose_units_cannot_lead_their_block_is_refused_with_nothing_changed(
    load, tmp_path, loader, case
):
    extra, edit = UNCONTIGUOUS[case]
    fields = {"heads_per_layer": 2, "channels_per_layer": 3, "permute": True} | extra  # 2 heads: one K/V group
    get_peft_model(load("llama-gqa"), _config(init_weights=False, **extra, permute=True)).save_pretrained(tmp_path)
    _rewrite(tmp_path, edit)
    model = load("llama-gqa")
    if loader == "over the same name":
        model = get_peft_model(model, S2FTConfig(task_type="CAUSAL_LM", **fields))
    before = model_snapshot(model)
    # Split heads are not an S2FT file for this model at all: refused by the file check, before permute mode's.
    message = "do not form whole heads" if case == "columns that are not whole heads" else "cannot make the units"
    with pytest.raises(ValueError, match=message):
        if loader == "PeftModel.from_pretrained":
            PeftModel.from_pretrained(model, tmp_path)
        elif loader == "transformers load_adapter":
            model.load_adapter(str(tmp_path), adapter_name="loaded")
        else:
            model.load_adapter(tmp_path, adapter_name="default")
    assert_same_snapshot(before, model_snapshot(model))


def test_another_method_wrapping_a_co_permuted_module_afterwards_fails_loudly(load, input_ids):
    model = get_peft_model(load("llama-gqa"), _config(permute=True))
    inject_adapter_in_model(LoraConfig(target_modules=["q_proj"]), model.base_model.model, adapter_name="lora")
    with pytest.raises(RuntimeError, match="co-permuted .* was wrapped by another PEFT method"):
        model(input_ids)
