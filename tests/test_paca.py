"""PaCA as its own PEFT method on S2FT's layer: r random input columns of every targeted linear layer, trained with
partial back-propagation, merged by copy, saved in S2FT's format and loaded through every PEFT / transformers path."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, BloomConfig, GPT2Config

from peft_s2ft import PaCAConfig, PaCAPeftType
from peft_s2ft.layer import S2FTLayer
from peft_s2ft.linear_like import logical_weight
from peft_s2ft.paca import random_columns

LINEAR_PER_LAYER = tuple(f"self_attn.{p}_proj" for p in "qkvo") + tuple(f"mlp.{p}_proj" for p in ("gate", "up", "down"))


def _layers(model) -> dict[str, S2FTLayer]:
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, S2FTLayer)
    }


def _reference_logits(base, peft_model, ids, adapter="default"):
    """The base model with W[:, S] += D written into a copy of each weight: what PaCA's forward must equal."""
    with torch.no_grad():
        for path, layer in _layers(peft_model).items():
            weight = logical_weight(base.get_submodule(path))  # (out, in), also for GPT-2's Conv1D
            weight.index_add_(1, layer.selected(adapter), layer.s2ft_delta[adapter].detach())
        return base(input_ids=ids).logits


def test_every_linear_layer_but_the_output_trains_r_columns(load):
    model = get_peft_model(load("llama-gqa"), PaCAConfig(r=4))
    layers = _layers(model)
    assert sorted(layers) == sorted(f"model.layers.{i}.{p}" for i in range(2) for p in LINEAR_PER_LAYER)
    for layer in layers.values():
        assert layer.selected("default").tolist() == sorted(set(layer.selected("default").tolist()))
        assert tuple(layer.s2ft_delta["default"].shape) == (layer.out_features, 4)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(layer.out_features * 4 for layer in layers.values())
    assert model.peft_config["default"].peft_type == PaCAPeftType.PACA


def test_columns_depend_on_seed_and_path_only(load):
    everywhere = _layers(get_peft_model(load("llama-gqa"), PaCAConfig(r=4)))
    only_v = _layers(get_peft_model(load("llama-gqa"), PaCAConfig(r=4, target_modules=["v_proj"])))
    assert sorted(only_v) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    for path, layer in only_v.items():
        assert torch.equal(layer.selected("default"), everywhere[path].selected("default"))
    reseeded = _layers(get_peft_model(load("llama-gqa"), PaCAConfig(r=4, seed=1)))
    assert any(not torch.equal(reseeded[p].selected("default"), everywhere[p].selected("default")) for p in everywhere)


def test_forward_equals_the_base_with_the_columns_added(load, input_ids):
    model = get_peft_model(load("llama-gqa"), PaCAConfig(r=3, init_weights=False))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    torch.testing.assert_close(logits, _reference_logits(load("llama-gqa"), model, input_ids), rtol=1e-5, atol=1e-5)


def test_training_changes_only_the_deltas_and_saves_only_selected_columns(load, input_ids):
    model = get_peft_model(load("llama-gqa"), PaCAConfig(r=3))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)
    assert all(layer.s2ft_delta["default"].abs().sum() > 0 for layer in _layers(model).values())

    layer = _layers(model)["model.layers.0.mlp.down_proj"]
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        layer(x)
    assert torch.Size([2, 5, layer.in_features]) not in saved  # never the whole input, nor flattened
    assert torch.Size([10, layer.in_features]) not in saved
    assert torch.Size([2, 5, 3]) in saved or torch.Size([10, 3]) in saved


def test_save_load_round_trip_in_s2ft_format(load, input_ids, tmp_path):
    model = get_peft_model(load("llama-gqa"), PaCAConfig(r=3, init_weights=False))
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PACA" and saved["r"] == 3
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, PaCAConfig)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[1] for k in keys} == {"s2ft_delta", "s2ft_indices"}
    assert len(keys) == 2 * 14

    loaded = PeftModel.from_pretrained(load("llama-gqa"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, expected, rtol=0, atol=0)

    through_transformers = load("llama-gqa")
    through_transformers.load_adapter(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(through_transformers(input_ids=input_ids).logits, expected, rtol=0, atol=0)


def test_loading_follows_the_file_even_when_the_config_would_draw_other_columns(load, input_ids, tmp_path):
    model = get_peft_model(load("llama-gqa"), PaCAConfig(r=3, init_weights=False))
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(saved | {"seed": 7}))  # the file's columns are the truth
    loaded = PeftModel.from_pretrained(load("llama-gqa"), tmp_path)
    for path, layer in _layers(loaded).items():
        assert torch.equal(layer.selected("default"), _layers(model)[path].selected("default"))


def test_a_file_of_another_model_is_refused(load, tmp_path):
    model = get_peft_model(load("llama-gqa"), PaCAConfig(r=3))
    model.save_pretrained(tmp_path)
    narrower = AutoModelForCausalLM.from_config(_narrower_ffn(load("llama-gqa").config))
    with pytest.raises(ValueError, match="delta of shape|indices from"):
        PeftModel.from_pretrained(narrower, tmp_path)


def _narrower_ffn(config):
    config = config.__class__.from_dict(config.to_dict())
    config.intermediate_size = 24  # down_proj: fewer input columns, gate/up: fewer output rows
    return config


def test_merge_unmerge_bit_exact_and_merge_and_unload(load, input_ids):
    model = get_peft_model(load("llama-gqa"), PaCAConfig(r=3, init_weights=False))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        for _ in range(3):
            model.merge_adapter()
            torch.testing.assert_close(model(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)
            model.unmerge_adapter()
        assert all(torch.equal(weights[n], p) for n, p in model.named_parameters() if n in weights)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, S2FTLayer) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_several_adapters_switch_and_serve_mixed_batches(load, input_ids):
    model = get_peft_model(load("llama-gqa"), PaCAConfig(r=3, init_weights=False))
    model.add_adapter("second", PaCAConfig(r=2, seed=1, init_weights=False))
    layers = _layers(model)
    assert all({"default", "second"} <= set(layer.s2ft_delta) for layer in layers.values())
    model.eval()
    with torch.no_grad():
        alone = {}
        for name in ("default", "second"):
            model.set_adapter(name)
            alone[name] = model(input_ids=input_ids).logits
        with model.disable_adapter():
            alone["__base__"] = model(input_ids=input_ids).logits
        names = ["second", "__base__"]
        mixed = model(input_ids=input_ids, adapter_names=names).logits
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone["default"], alone["second"])


def test_impossible_configs_are_refused_and_leave_the_model(load):
    with pytest.raises(ValueError, match=r"PaCAConfig\.r=0"):
        PaCAConfig(r=0)
    with pytest.raises(ValueError, match=r"PaCAConfig\.target_modules=None"):
        PaCAConfig(target_modules=None)
    model = load("llama-gqa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"r=33, but 'model\.layers\.0\.self_attn\.q_proj' has only 32 input columns"):
        get_peft_model(model, PaCAConfig(r=33))
    with pytest.raises(ValueError, match="PaCA adapts linear layers.*Embedding"):
        get_peft_model(model, PaCAConfig(target_modules=["embed_tokens"]))
    assert not any(isinstance(m, S2FTLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_layer_of_another_method_is_refused_and_its_config_kept(load):
    model = get_peft_model(load("llama-gqa"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already a layer of another PEFT method"):
        get_peft_model(model.base_model.model, PaCAConfig(target_modules=["q_proj"]))
    assert isinstance(model.peft_config["default"], LoraConfig)
    assert not any(isinstance(m, S2FTLayer) for m in model.modules())


def test_paca_and_s2ft_on_rows_and_columns_of_one_layer_are_refused(load):
    from peft_s2ft import S2FTConfig

    model = load("llama-gqa")
    model.add_adapter(S2FTConfig(train_v=True, init_weights=False), adapter_name="s2ft")  # V rows of v_proj
    with pytest.raises(ValueError, match="already trains output rows .* would train its input columns"):
        model.add_adapter(PaCAConfig(r=2, target_modules=["v_proj"]), adapter_name="paca")


def test_fusion_is_refused_with_a_reason(load):
    model = get_peft_model(load("llama-gqa"), PaCAConfig(r=2))
    model.add_adapter("other", PaCAConfig(r=2, seed=1))
    with pytest.raises(NotImplementedError, match="PaCA adapters cannot be fused"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "fused")


def test_conv1d_and_an_undescribed_family_save_and_load_through_every_path(tmp_path, input_ids):
    torch.manual_seed(0)
    configs = {
        "bloom": BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4),
        "gpt2": GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    }
    for name, config in configs.items():
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / name)
        fresh = lambda path=tmp_path / name: AutoModelForCausalLM.from_pretrained(path).eval()  # noqa: E731
        model = get_peft_model(fresh(), PaCAConfig(r=4, init_weights=False))
        assert len(_layers(model)) == 2 * 4  # bloom: query_key_value, dense, dense_h_to_4h, dense_4h_to_h;
        # gpt2: c_attn, c_proj, c_fc, mlp.c_proj
        with torch.no_grad():
            expected = model(input_ids=input_ids).logits
            torch.testing.assert_close(expected, _reference_logits(fresh(), model, input_ids), rtol=1e-5, atol=1e-5)
        model.save_pretrained(tmp_path / f"{name}-adapter")
        loaded = PeftModel.from_pretrained(fresh(), tmp_path / f"{name}-adapter")
        direct = fresh()
        direct.load_adapter(str(tmp_path / f"{name}-adapter"))
        with torch.no_grad():
            for other in (loaded, direct):
                torch.testing.assert_close(other(input_ids=input_ids).logits, expected, rtol=0, atol=0)


def test_a_refused_file_leaves_the_model_as_it_was(load, tmp_path):
    model = get_peft_model(load("llama-gqa"), PaCAConfig(r=3))
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("s2ft_indices"))
    tensors[key] = tensors[key] + 1000  # out of range
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    base = load("llama-gqa")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="indices from .* but the base model's layer has only"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, S2FTLayer) for m in base.modules())
    assert {k: v for k, v in base.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_every_field_has_help():
    own = {f.name for f in dataclasses.fields(PaCAConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    for f in dataclasses.fields(PaCAConfig):
        if f.name in own:
            assert f.metadata.get("help"), f.name


def test_random_columns_are_distinct_and_reproducible():
    layer = nn.Linear(50, 3)
    first = random_columns(PaCAConfig(r=10), "a.b", layer)
    assert torch.equal(first, random_columns(PaCAConfig(r=10), "a.b", layer))
    assert len(set(first.tolist())) == 10 and first.max() < 50


def test_export_to_lora_is_exact(load, input_ids, tmp_path):
    from peft_s2ft import export_lora

    model = get_peft_model(load("llama-gqa"), PaCAConfig(r=3, init_weights=False))
    export_lora(model, tmp_path / "lora", pad_to_rank="vllm")
    lora = PeftModel.from_pretrained(load("llama-gqa"), tmp_path / "lora")
    assert isinstance(lora.peft_config["default"], LoraConfig) and lora.peft_config["default"].r == 8
    with torch.no_grad():
        torch.testing.assert_close(
            lora(input_ids=input_ids).logits, model(input_ids=input_ids).logits, rtol=1e-5, atol=1e-5
        )


def test_layers_to_transform_restricts_all_linear(load):
    """PEFT ignores layers_to_transform for full module paths, which is what 'all-linear' expands to."""
    layers = _layers(get_peft_model(load("llama-gqa"), PaCAConfig(r=2, layers_to_transform=[1])))
    assert sorted(layers) == sorted(f"model.layers.1.{p}" for p in LINEAR_PER_LAYER)


def test_no_paca_adapter_beside_an_s2ft_adapter_in_permute_mode(load):
    from peft_s2ft import S2FTConfig

    model = load("llama-gqa")
    model.add_adapter(S2FTConfig(permute=True), adapter_name="s2ft")
    with pytest.raises(ValueError, match=r"permute=True .* supports a single adapter per model"):
        model.add_adapter(PaCAConfig(r=2, target_modules=["q_proj"]), adapter_name="paca")
    assert not any(isinstance(m, S2FTLayer) and "paca" in m.s2ft_delta for m in model.modules())
