"""export_lora: an S2FT adapter written as a standard PEFT LoRA folder that plain PEFT loads and that reproduces the
S2FT model exactly; and PEFT's own convert_to_lora over S2FT adapters that cover different layers."""

from __future__ import annotations

import json
import os

import peft
import pytest
import torch
from families import FAMILIES, build, load, main_output, sample_input_ids
from peft import LoraModel, PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_s2ft.export as export_module
from peft_s2ft import S2FTConfig, S2FTLayer
from peft_s2ft.export import VLLM_RANKS, export_lora
from peft_s2ft.partial_backprop import ROWS

FAMILY_NAMES = ("llama", "gpt2", "bert-seq-cls", "mixtral")
ATOL = 1e-5


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    return {name: build(name, tmp_path_factory.mktemp(name)) for name in FAMILY_NAMES}


def _s2ft(dirs, name: str = "llama", adapter: str = "default", **kwargs) -> PeftModel:
    """An S2FT adapter with a random non-zero delta, so it visibly changes the model."""
    torch.manual_seed(0)
    config = S2FTConfig(task_type=FAMILIES[name].task_type, init_weights=False, **kwargs)
    return get_peft_model(load(dirs[name], name), config, adapter_name=adapter).eval()


def _output(model, name: str) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(input_ids=sample_input_ids(name)))


def _layers(model: PeftModel, adapter: str = "default") -> dict[str, S2FTLayer]:
    modules = model.base_model.model.named_modules()
    return {path: m for path, m in modules if isinstance(m, S2FTLayer) and adapter in m.s2ft_delta}


def _load_lora(dirs, name: str, folder) -> PeftModel:
    lora = PeftModel.from_pretrained(load(dirs[name], name), str(folder)).eval()
    assert isinstance(lora.base_model, LoraModel)
    return lora


def _assert_reproduces(dirs, name: str, s2ft: PeftModel, folder) -> PeftModel:
    """The LoRA on a fresh base gives the S2FT model's outputs, which differ from the base model's."""
    expected = _output(s2ft, name)
    base = _output(load(dirs[name], name), name)
    assert (expected - base).abs().max() > 1e-2, "the adapter must change the outputs, or the check proves nothing"
    lora = _load_lora(dirs, name, folder)
    torch.testing.assert_close(_output(lora, name), expected, atol=ATOL, rtol=0)
    return lora


def _config(folder) -> dict:
    with open(os.path.join(folder, "adapter_config.json")) as file:
        return json.load(file)


# --------------------------------------------------------------------------------------------------
# exact reproduction
def test_default_config_is_reproduced_with_its_own_ranks_and_standard_keys(dirs, tmp_path):
    model = _s2ft(dirs)
    layers = _layers(model)
    config = export_lora(model, tmp_path)
    _assert_reproduces(dirs, "llama", model, tmp_path)

    assert set(config.target_modules) == set(layers)
    assert config.peft_type == peft.PeftType.LORA and config.r == config.lora_alpha
    keys = set(load_file(os.path.join(tmp_path, "adapter_model.safetensors")))
    assert keys == {f"base_model.model.{p}.lora_{ab}.weight" for p in layers for ab in "AB"}
    written = _config(tmp_path)
    assert written["peft_type"] == "LORA" and written["base_model_name_or_path"] == dirs["llama"]
    assert written["task_type"] == "CAUSAL_LM" and written["bias"] == "none" and written["use_dora"] is False
    for path, layer in layers.items():  # each module at its own rank, alpha = rank: scaling 1
        k = len(layer.selected("default"))
        assert written["rank_pattern"].get(path, written["r"]) == k
        assert written["alpha_pattern"].get(path, written["lora_alpha"]) == k


def test_value_and_up_rows_are_reproduced(dirs, tmp_path):
    model = _s2ft(dirs, train_v=True, train_up=True)
    assert any(layer.axis == ROWS for layer in _layers(model).values())
    export_lora(model, tmp_path)
    _assert_reproduces(dirs, "llama", model, tmp_path)


def test_gpt2_conv1d_is_reproduced_unmerged_and_merged(dirs, tmp_path):
    model = _s2ft(dirs, "gpt2", train_v=True)
    config = export_lora(model, tmp_path)
    assert config.fan_in_fan_out is True and _config(tmp_path)["fan_in_fan_out"] is True
    lora = _assert_reproduces(dirs, "gpt2", model, tmp_path)
    # Merging transposes by fan_in_fan_out: wrong orientation would change the merged outputs.
    merged = lora.merge_and_unload()
    torch.testing.assert_close(_output(merged, "gpt2"), _output(model, "gpt2"), atol=ATOL, rtol=0)


def test_adapter_loaded_through_transformers_load_adapter(dirs, tmp_path):
    _s2ft(dirs).save_pretrained(tmp_path / "s2ft")
    model = load(dirs["llama"], "llama")
    model.load_adapter(str(tmp_path / "s2ft"))
    export_lora(model, tmp_path / "lora")
    _assert_reproduces(dirs, "llama", model, tmp_path / "lora")


def test_one_of_several_adapters_is_exported_with_only_its_layers(dirs, tmp_path):
    model = _s2ft(dirs, adapter="first", layers_to_transform=[0])
    model.add_adapter("second", S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=1))
    for adapter in ("first", "second"):
        model.base_model.set_adapter(adapter)
        folder = tmp_path / adapter
        config = export_lora(model, folder, adapter_name=adapter)
        assert set(config.target_modules) == set(_layers(model, adapter))
        _assert_reproduces(dirs, "llama", model, folder)
    assert all(".layers.0." in path for path in _config(tmp_path / "first")["target_modules"])


def test_adapter_on_some_layers_only(dirs, tmp_path):
    model = _s2ft(dirs, layers_to_transform=[1])
    config = export_lora(model, tmp_path)
    assert config.target_modules and all(".layers.1." in path for path in config.target_modules)
    _assert_reproduces(dirs, "llama", model, tmp_path)


def test_permute_mode_is_exported_in_original_coordinates(dirs, tmp_path):
    model = _s2ft(dirs, permute=True, heads_per_layer=3, channels_per_layer=5, train_v=True, train_up=True)
    assert any(layer.block_range is not None for layer in _layers(model).values())
    export_lora(model, tmp_path)
    _assert_reproduces(dirs, "llama", model, tmp_path)


def test_merged_adapter_exports_its_delta_once(dirs, tmp_path):
    model = _s2ft(dirs)
    model.merge_adapter()
    export_lora(model, tmp_path)
    _assert_reproduces(dirs, "llama", model, tmp_path)


@pytest.mark.parametrize("pad", ["int", "vllm"])
def test_padded_ranks(dirs, tmp_path, pad):
    model = _s2ft(dirs, heads_per_layer=1, channels_per_layer=11)  # ranks 8 and 11
    largest = max(len(layer.selected("default")) for layer in _layers(model).values())
    rank = largest + 3 if pad == "int" else 16
    config = export_lora(model, tmp_path, pad_to_rank=largest + 3 if pad == "int" else "vllm")
    assert config.r == config.lora_alpha == rank and not config.rank_pattern and not config.alpha_pattern
    for key, tensor in load_file(os.path.join(tmp_path, "adapter_model.safetensors")).items():
        assert tensor.shape[0 if "lora_A" in key else 1] == rank
    _assert_reproduces(dirs, "llama", model, tmp_path)


def test_written_config_meets_vllms_rules(dirs, tmp_path):
    model = _s2ft(dirs, heads_per_layer=1, channels_per_layer=11)
    export_lora(model, tmp_path, pad_to_rank="vllm")
    config = _config(tmp_path)
    # vllm/lora/peft_helper.py and vllm/config/lora.py: r within the allowed ranks, one scaling lora_alpha / r,
    # target_modules given, no modules_to_save, no DoRA, no bias.
    assert config["r"] in VLLM_RANKS and config["lora_alpha"] == config["r"]
    assert not config.get("rank_pattern") and not config.get("alpha_pattern")
    assert config["target_modules"] and not config.get("modules_to_save")
    assert config["use_dora"] is False and config["bias"] == "none" and config["peft_type"] == "LORA"
    shapes = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert {t.shape[0] for k, t in shapes.items() if "lora_A" in k} == {config["r"]}


def test_modules_to_save_are_written_as_lora_modules_to_save(dirs, tmp_path):
    model = _s2ft(dirs, "bert-seq-cls")
    classifier = model.base_model.model.classifier
    with torch.no_grad():  # a trained classifier: its copy differs from the fresh base's
        classifier.modules_to_save["default"].weight.add_(0.5)
    config = export_lora(model, tmp_path)
    assert "classifier" in config.modules_to_save
    keys = set(load_file(os.path.join(tmp_path, "adapter_model.safetensors")))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    _assert_reproduces(dirs, "bert-seq-cls", model, tmp_path)


# --------------------------------------------------------------------------------------------------
# refusals: each leaves no folder, or the previous one byte for byte
def _snapshot(folder) -> dict[str, bytes]:
    if not os.path.exists(folder):
        return {}
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "message"),
    [
        ("mixtral", {}, TypeError, r"fused experts 'model\.layers\.\d\.mlp\.experts'"),
        ("llama", {"pad_to_rank": 3}, ValueError, "pad_to_rank=3 is below"),
        ("llama", {"pad_to_rank": "lora"}, ValueError, "pad_to_rank must be"),
        ("llama", {"adapter_name": "other"}, ValueError, "no adapter named 'other'.*default"),
        ("bert-seq-cls", {"pad_to_rank": "vllm"}, ValueError, "vLLM refuses LoRA adapters with modules_to_save"),
    ],
)
def test_refusals_leave_the_folder_as_it_was(dirs, tmp_path, name, kwargs, error, message):
    model = _s2ft(dirs, name)
    with pytest.raises(error, match=message):
        export_lora(model, tmp_path / "new", **kwargs)
    assert not os.path.exists(tmp_path / "new") and os.listdir(tmp_path) == []


def test_vllm_refuses_a_rank_above_512():
    with pytest.raises(ValueError, match="above vLLM's largest LoRA rank 512"):
        export_module._target_rank("vllm", 513)
    assert export_module._target_rank("vllm", 320) == 320 and export_module._target_rank("vllm", 9) == 16


def test_a_failed_write_keeps_the_previous_export(dirs, tmp_path, monkeypatch):
    model = _s2ft(dirs)
    export_lora(model, tmp_path / "out")
    before = _snapshot(tmp_path / "out")

    def half_written(tensors, path, metadata=None):
        with open(path, "wb") as file:
            file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        export_lora(model, tmp_path / "out", pad_to_rank=32)
    assert _snapshot(tmp_path / "out") == before
    with pytest.raises(OSError, match="disk full"):
        export_lora(model, tmp_path / "fresh")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_the_other_weights_format_does_not_survive_a_re_export(dirs, tmp_path):
    # PEFT loads adapter_model.safetensors before adapter_model.bin: a stale one would shadow the new export.
    export_lora(_s2ft(dirs, seed=5), tmp_path)
    model = _s2ft(dirs)
    export_lora(model, tmp_path, safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.bin"]
    _assert_reproduces(dirs, "llama", model, tmp_path)


def test_refuses_to_overwrite_the_s2ft_adapter_folder(dirs, tmp_path):
    model = _s2ft(dirs)
    model.save_pretrained(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="holds an adapter of another method"):
        export_lora(model, tmp_path)
    assert _snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------------
# PEFT's convert_to_lora (SVD) over S2FT adapters
def _two_adapters_on_different_layers(dirs) -> PeftModel:
    model = _s2ft(dirs, adapter="first", layers_to_transform=[0])
    model.add_adapter("second", S2FTConfig(task_type="CAUSAL_LM", init_weights=False, layers_to_transform=[1]))
    return model


def test_convert_to_lora_converts_an_adapter_that_other_layers_do_not_hold(dirs, tmp_path):
    # Regression: every S2FT layer said it supports the conversion, and the layers of the other adapter then failed
    # in get_delta_weight with AttributeError: 'ParameterDict' object has no attribute 'first'.
    model = _two_adapters_on_different_layers(dirs)
    for adapter in ("first", "second"):
        model.base_model.set_adapter(adapter)
        peft.save_as_lora(tmp_path / adapter, model, rank=8, adapter_name=adapter)
        _assert_reproduces(dirs, "llama", model, tmp_path / adapter)


def test_convert_to_lora_refuses_an_adapter_the_model_does_not_have(dirs):
    model = _two_adapters_on_different_layers(dirs)
    with pytest.raises(ValueError, match="'typo'"):
        peft.convert_to_lora(model, 8, adapter_name="typo")


def test_convert_to_lora_refuses_fused_experts(dirs):
    with pytest.raises(TypeError, match="S2FTExpertsLayer"):
        peft.convert_to_lora(_s2ft(dirs, "mixtral"), 8)
