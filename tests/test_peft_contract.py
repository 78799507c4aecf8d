"""Ports of the properties PEFT's common tester asserts on every tuner, on Llama-family models."""

import copy
import json
import os
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_base_model_state_dict, set_base_model_state_dict
from safetensors.torch import load_file

from peft_s2ft import S2FTConfig
from peft_s2ft.checkpoint import AdapterMismatchError
from tests.conftest import MODEL_NAMES

MODES = [False, True]  # permute


def _config(permute=False, **kwargs):
    kwargs.setdefault("heads_per_layer", 2)
    kwargs.setdefault("channels_per_layer", 3)
    return S2FTConfig(task_type="CAUSAL_LM", permute=permute, **kwargs)


def _train(model, input_ids, steps=3, lr=0.05):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("permute", MODES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_function_preserved_and_base_contract_kept(load, input_ids, name, permute):
    model = load(name)
    original = _state(model)
    expected = model(input_ids).logits
    peft_model = get_peft_model(model, _config(permute, train_v=True, train_up=True))
    torch.testing.assert_close(peft_model(input_ids).logits, expected, atol=1e-5, rtol=1e-5)

    _train(peft_model, input_ids)
    trained = peft_model(input_ids).logits
    assert not torch.allclose(trained, expected)
    _assert_same_state(get_base_model_state_dict(peft_model), original)
    set_base_model_state_dict(peft_model, get_base_model_state_dict(peft_model))
    torch.testing.assert_close(peft_model(input_ids).logits, trained)
    with peft_model.disable_adapter():
        torch.testing.assert_close(peft_model(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(peft_model(input_ids).logits, trained)

    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(merged(input_ids).logits, trained, atol=1e-5, rtol=1e-5)
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, original[k])}
    assert changed and all(
        k.endswith(("o_proj.weight", "down_proj.weight", "v_proj.weight", "up_proj.weight")) for k in changed
    )
    for key in [k for k in changed if k.endswith(("o_proj.weight", "down_proj.weight"))]:
        touched_columns = (merged.state_dict()[key] != original[key]).any(dim=0).sum()
        assert 0 < touched_columns <= 2 * 8  # only the selected columns moved


@pytest.mark.parametrize("permute", MODES)
def test_unload_returns_the_original_weights_bit_for_bit(load, input_ids, permute):
    model = load("qwen2-bias")
    original = _state(model)
    peft_model = get_peft_model(model, _config(permute, init_weights=False, train_v=True))
    _train(peft_model, input_ids)
    _assert_same_state(_state(peft_model.unload()), original)


@pytest.mark.parametrize("permute", MODES)
def test_init_weights_false_changes_the_output(load, input_ids, permute):
    model = load("llama-gqa")
    expected = model(input_ids).logits
    peft_model = get_peft_model(model, _config(permute, init_weights=False))
    assert not torch.allclose(peft_model(input_ids).logits, expected)


@pytest.mark.parametrize("permute", MODES)
def test_only_prefixed_parameters_train_and_all_of_them_change(load, input_ids, permute):
    peft_model = get_peft_model(load("llama-mha"), _config(permute))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("s2ft_" in n for n in trainable)
    _train(peft_model, input_ids)
    for name, param in peft_model.named_parameters():
        if name in trainable:
            assert not torch.allclose(param, before[name]), name
        else:
            assert param.grad is None
            if not permute:  # permute mode keeps the trained block merged in the base weight
                assert torch.equal(param, before[name]), name


@pytest.mark.parametrize("permute", MODES)
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_save_and_reload_on_a_fresh_base(load, input_ids, tmp_path, permute, low_cpu_mem_usage):
    peft_model = get_peft_model(load("llama-gqa"), _config(permute, seed=3, train_v=True))
    _train(peft_model, input_ids)
    expected = peft_model(input_ids).logits
    peft_model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    stored = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.endswith((".s2ft_delta", ".s2ft_indices")) for k in stored)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert sum(v.numel() for k, v in stored.items() if k.endswith("delta")) == trainable
    assert os.path.getsize(tmp_path / "adapter_model.safetensors") < 4 * trainable * 1.1 + 4096

    # A different seed in the config would select other heads: the indices must come from the file.
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["seed"] = 12345
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    torch.manual_seed(99)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(load("llama-gqa"), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    # PEFT warns with these words when an adapter tensor of the model is not in the file.
    assert not [r for r in record if "Found missing adapter keys" in str(r.message)]
    torch.testing.assert_close(loaded(input_ids).logits, expected)
    _assert_same_state(
        {k: v for k, v in loaded.state_dict().items() if "s2ft_" in k},
        {k: v for k, v in peft_model.state_dict().items() if "s2ft_" in k},
    )


def test_saved_indices_are_in_original_coordinates(load, input_ids, tmp_path):
    for permute in MODES:
        peft_model = get_peft_model(load("llama-gqa"), _config(permute))
        _train(peft_model, input_ids)
        peft_model.save_pretrained(tmp_path / str(permute))
    plain = load_file(tmp_path / "False" / "adapter_model.safetensors")
    permuted = load_file(tmp_path / "True" / "adapter_model.safetensors")
    for key in [k for k in plain if k.endswith("down_proj.s2ft_indices")]:
        assert set(plain[key].tolist()) == set(permuted[key].tolist())


def test_global_allocation_reloads_even_when_layers_differ(load, input_ids, tmp_path):
    config = S2FTConfig(task_type="CAUSAL_LM", allocation="global", heads_per_layer=3, channels_per_layer=5, seed=1)
    peft_model = get_peft_model(load("llama-mha"), config)
    _train(peft_model, input_ids)
    expected = peft_model(input_ids).logits
    peft_model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "adapter_config.json").read_text())
    for seed in range(2, 12):  # find a seed whose selection touches other layers
        stored["seed"] = seed
        (tmp_path / "adapter_config.json").write_text(json.dumps(stored))
        loaded = PeftModel.from_pretrained(load("llama-mha"), tmp_path)
        torch.testing.assert_close(loaded(input_ids).logits, expected)


def _corrupt(tmp_path, edit):
    from safetensors.torch import save_file

    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.update({k: t[k] + 1000 for k in t if k.endswith("layers.1.mlp.down_proj.s2ft_indices")}),
            r"layers\.1\.mlp\.down_proj.*indices from .* up to",
        ),
        (
            lambda t: t.update(
                {k: t[k][:, :2].contiguous() for k in t if k.endswith("layers.0.self_attn.o_proj.s2ft_delta")}
            ),
            r"layers\.0\.self_attn\.o_proj.*shape",
        ),
        (
            lambda t: t.update({k.replace("layers.1", "layers.7"): v.clone() for k, v in list(t.items())}),
            r"layers\.7",
        ),
        (
            lambda t: t.pop(next(k for k in t if k.endswith("layers.0.mlp.down_proj.s2ft_indices"))),
            r"layers\.0\.mlp\.down_proj.*s2ft_indices",
        ),
    ],
)
@pytest.mark.parametrize("permute", MODES)
def test_a_mismatched_adapter_is_refused_and_the_model_left_as_it_was(load, tmp_path, edit, message, permute):
    get_peft_model(load("llama-gqa"), _config(permute, init_weights=False)).save_pretrained(tmp_path)
    _corrupt(tmp_path, edit)
    model = load("llama-gqa")
    original = _state(model)
    with pytest.raises(AdapterMismatchError, match=message):
        PeftModel.from_pretrained(model, tmp_path)
    assert not any(type(m).__name__ == "S2FTLayer" for m in model.modules())
    _assert_same_state(_state(model), original)


@pytest.mark.parametrize("permute", MODES)
def test_merge_unmerge_and_idempotent_merge(load, input_ids, permute):
    peft_model = get_peft_model(load("qwen3"), _config(permute, init_weights=False))
    expected = peft_model(input_ids).logits
    peft_model.merge_adapter()
    peft_model.merge_adapter()  # merging twice is a no-op with a warning
    torch.testing.assert_close(peft_model(input_ids).logits, expected, atol=1e-5, rtol=1e-5)
    peft_model.unmerge_adapter()
    torch.testing.assert_close(peft_model(input_ids).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("permute", MODES)
def test_safe_merge_refuses_nan(load, permute):
    peft_model = get_peft_model(load("llama-gqa"), _config(permute, init_weights=False))
    delta = next(p for n, p in peft_model.named_parameters() if "s2ft_delta" in n)
    with torch.no_grad():
        delta[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be"):
        peft_model.merge_and_unload(safe_merge=True)


def test_several_adapters_with_different_selections(load, input_ids):
    model = get_peft_model(load("llama-gqa"), _config(seed=0, init_weights=False))
    out_default = model(input_ids).logits
    model.add_adapter("other", _config(seed=1, init_weights=False, heads_per_layer=1))
    indices = {n: b for n, b in model.named_buffers() if "s2ft_indices" in n}
    assert any(
        not torch.equal(indices[n], indices[n.replace("default", "other")])
        for n in indices
        if n.endswith("default") and "o_proj" in n
    )
    torch.testing.assert_close(model(input_ids).logits, out_default)  # "other" is inactive
    model.set_adapter("other")
    out_other = model(input_ids).logits
    assert not torch.allclose(out_other, out_default)
    assert all(("other" in n) == p.requires_grad for n, p in model.named_parameters() if "s2ft_" in n)

    model.base_model.set_adapter(["default", "other"])
    both = model(input_ids).logits
    with model.disable_adapter():
        base = model(input_ids).logits
    assert not torch.allclose(both, out_default) and not torch.allclose(both, out_other)

    model.set_adapter("default")
    model.merge_adapter(["default", "other"])
    torch.testing.assert_close(model(input_ids).logits, both, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()

    model.delete_adapter("other")
    assert not any("other" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(input_ids).logits, out_default)
    model.delete_adapter("default")  # the last one
    assert not any("s2ft_delta" in n for n, _ in model.named_parameters())
    # PeftModel.forward needs an active config; the wrapped model runs as the base model.
    torch.testing.assert_close(model.base_model.model(input_ids).logits, base)
    with pytest.raises(ValueError):
        model.delete_adapter("unknown")


def test_permute_mode_allows_one_adapter_only(load):
    model = get_peft_model(load("llama-gqa"), _config(permute=True))
    with pytest.raises(ValueError, match="single adapter"):
        model.add_adapter("other", _config())
    assert list(model.peft_config) == ["default"]


def test_adapter_named_like_a_module_is_refused(load):
    with pytest.raises(ValueError, match="3584"):
        get_peft_model(load("llama-gqa"), _config(), adapter_name="mlp")


@pytest.mark.parametrize(
    ("kwargs", "layers"),
    [({"layers_to_transform": [1]}, {1}), ({"exclude_modules": r".*layers\.0\..*"}, {1})],
)
def test_layer_restrictions(load, kwargs, layers):
    model = get_peft_model(load("llama-gqa"), _config(**kwargs))
    adapted = {int(n.split("layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "s2ft_" in n}
    assert adapted == layers


def test_modules_to_save_are_trained_and_saved(load, input_ids, tmp_path):
    model = get_peft_model(load("llama-gqa"), _config(modules_to_save=["lm_head"]))
    assert any("modules_to_save" in n and p.requires_grad for n, p in model.named_parameters())
    _train(model, input_ids)
    expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    assert any("lm_head" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    torch.testing.assert_close(PeftModel.from_pretrained(load("llama-gqa"), tmp_path)(input_ids).logits, expected)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing(load, input_ids, use_reentrant):
    reference = get_peft_model(load("llama-gqa"), _config(init_weights=False))
    checkpointed = copy.deepcopy(reference)
    checkpointed.base_model.model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    checkpointed.base_model.model.enable_input_require_grads()
    grads = []
    for model in (reference, checkpointed):
        model.train()
        model(input_ids, labels=input_ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_half_precision_base_keeps_adapter_dtype_when_asked(load, input_ids, tmp_path):
    model = get_peft_model(load("llama-gqa", dtype=torch.bfloat16), _config(), autocast_adapter_dtype=False)
    assert {p.dtype for n, p in model.named_parameters() if "s2ft_" in n} == {torch.bfloat16}
    _train(model, input_ids)
    upcast = get_peft_model(load("llama-gqa", dtype=torch.bfloat16), _config())
    assert {p.dtype for n, p in upcast.named_parameters() if "s2ft_" in n} == {torch.float32}
    _train(upcast, input_ids)


def test_generate_and_trainable_parameter_report(load, input_ids, capsys):
    model = get_peft_model(load("llama-gqa"), _config(init_weights=False))
    out = model.generate(input_ids=input_ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 13)
    model.print_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


def test_an_undescribed_model_type_is_refused_with_the_supported_list():
    from transformers import AutoModelForCausalLM, BloomConfig

    model = AutoModelForCausalLM.from_config(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="no description of model type 'bloom'. Described are: llama, "):
        get_peft_model(model, S2FTConfig(task_type="CAUSAL_LM"))


def test_a_target_that_is_not_a_trained_module_of_this_family_names_the_ones_that_are():
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match=r"contains 'o_proj', .* \(it trains attn.c_attn, attn.c_proj, mlp.c_fc"):
        get_peft_model(model, S2FTConfig(task_type="CAUSAL_LM", target_modules=["o_proj"]))


@pytest.mark.parametrize("permute", MODES)
def test_exports_losslessly_to_lora(load, input_ids, tmp_path, permute):
    from peft import LoraConfig, convert_to_lora, set_peft_model_state_dict

    peft_model = get_peft_model(load("llama-gqa"), _config(permute, init_weights=False))
    expected = peft_model(input_ids).logits
    lora_config, lora_state = convert_to_lora(peft_model, rank=16)  # 16 = the widest selection (2 heads x 8)
    assert isinstance(lora_config, LoraConfig)
    lora_model = get_peft_model(load("llama-gqa"), lora_config)
    set_peft_model_state_dict(lora_model, lora_state)
    torch.testing.assert_close(lora_model(input_ids).logits, expected, atol=1e-4, rtol=1e-4)
