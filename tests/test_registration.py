import importlib

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model, mapping

import peft_s2ft
from peft_s2ft import S2FTConfig, S2FTModel
from peft_s2ft.peft_type import S2FTPeftType


def test_importing_twice_is_harmless():
    importlib.reload(importlib.import_module("peft_s2ft.registration")).register()
    peft_s2ft.register()
    key = S2FTPeftType.S2FT
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] is S2FTModel
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] == "s2ft_"


def test_foreign_registration_is_not_overwritten(monkeypatch):
    key = S2FTPeftType.S2FT
    foreign = type("ForeignS2FTConfig", (), {})
    monkeypatch.setitem(mapping.PEFT_TYPE_TO_CONFIG_MAPPING, key, foreign)
    with pytest.raises(RuntimeError, match="already registered"):
        peft_s2ft.register()
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] is foreign


def _trained_adapter(load, tmp_path, input_ids):
    model = get_peft_model(load("llama-gqa"), S2FTConfig(task_type="CAUSAL_LM", init_weights=False))
    expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    return expected


def test_auto_peft_model_loads_s2ft(load, tmp_path, input_ids):
    expected = _trained_adapter(load, tmp_path, input_ids)
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(model, PeftModel)
    torch.testing.assert_close(model(input_ids).logits, expected)


def test_transformers_load_adapter(load, tmp_path, input_ids):
    expected = _trained_adapter(load, tmp_path, input_ids)
    model = load("llama-gqa")
    base = model(input_ids).logits
    model.load_adapter(str(tmp_path), adapter_name="task")
    torch.testing.assert_close(model(input_ids).logits, expected)
    model.delete_adapter("task")
    torch.testing.assert_close(model(input_ids).logits, base)
