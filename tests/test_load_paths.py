"""Every way users load an adapter runs the same checks: the file decides the selection, bad files are refused
with the layer's name, and a refused load leaves the model exactly as it was."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_s2ft import S2FTConfig
from peft_s2ft.checkpoint import AdapterMismatchError
from peft_s2ft.layer import S2FTLayer
from tests.snapshots import assert_same_snapshot, model_snapshot

ADAPTER_FILE = "adapter_model.safetensors"


def _from_pretrained(base, path):
    return PeftModel.from_pretrained(base, path)


def _low_cpu_mem_usage(base, path):
    return PeftModel.from_pretrained(base, path, low_cpu_mem_usage=True)


def _peft_load_adapter(base, path):
    model = get_peft_model(base, S2FTConfig(task_type="CAUSAL_LM", seed=7, heads_per_layer=1))
    model.load_adapter(path, adapter_name="loaded")
    model.set_adapter("loaded")
    return model


def _transformers_load_adapter(base, path):
    base.load_adapter(str(path), adapter_name="loaded")
    return base


def _auto_peft_model(base, path):
    return AutoPeftModelForCausalLM.from_pretrained(path)


LOADERS = {
    "PeftModel.from_pretrained": _from_pretrained,
    "low_cpu_mem_usage": _low_cpu_mem_usage,
    "PeftModel.load_adapter": _peft_load_adapter,
    "transformers load_adapter": _transformers_load_adapter,
    "AutoPeftModelForCausalLM": _auto_peft_model,
}

VARIANTS = {
    "other seed": dict(seed=3, heads_per_layer=2, channels_per_layer=3),
    "global allocation": dict(allocation="global", heads_per_layer=3, channels_per_layer=5, seed=1),
    "permute mode": dict(permute=True, seed=3, heads_per_layer=2, channels_per_layer=3),
    "value and up rows": dict(train_v=True, train_up=True, seed=3, heads_per_layer=1, channels_per_layer=4),
}


def _train(model, input_ids, steps=2):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _save_trained(load, input_ids, path, **config) -> torch.Tensor:
    model = get_peft_model(load("llama-mha"), S2FTConfig(task_type="CAUSAL_LM", **config))
    _train(model, input_ids)
    model.save_pretrained(path)
    # A config whose seed selects other units than the file's: loading must follow the file.
    stored = json.loads((path / "adapter_config.json").read_text())
    stored["seed"] = stored["seed"] + 1000
    (path / "adapter_config.json").write_text(json.dumps(stored))
    return model(input_ids).logits.detach()


def _selections_differ(load, path) -> bool:
    """True if the edited config alone would select other units than the file holds."""
    stored = json.loads((path / "adapter_config.json").read_text())
    fresh = get_peft_model(load("llama-mha"), S2FTConfig(**{k: v for k, v in stored.items() if k != "peft_type"}))
    by_config = {
        n.removeprefix("base_model.model.").removesuffix(".s2ft_indices.default"): set(b.tolist())
        for n, b in fresh.named_buffers()
        if "s2ft_indices" in n
    }
    by_file = {
        k.removeprefix("base_model.model.").removesuffix(".s2ft_indices"): set(v.tolist())
        for k, v in load_file(path / ADAPTER_FILE).items()
        if k.endswith("s2ft_indices")
    }
    return by_config != by_file


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("loader", list(LOADERS))
def test_the_file_decides_the_selection_on_every_load_path(load, input_ids, tmp_path, loader, variant):
    expected = _save_trained(load, input_ids, tmp_path, **VARIANTS[variant])
    assert _selections_differ(load, tmp_path)  # else the test would prove nothing
    if loader == "PeftModel.load_adapter" and variant == "permute mode":
        # A permute-mode adapter cannot join a model that already has an adapter: refused, model unchanged.
        model = get_peft_model(load("llama-mha"), S2FTConfig(task_type="CAUSAL_LM", seed=7, heads_per_layer=1))
        before = model_snapshot(model)
        with pytest.raises(ValueError, match="single adapter per model"):
            model.load_adapter(tmp_path, adapter_name="loaded")
        assert_same_snapshot(before, model_snapshot(model))
        return
    model = LOADERS[loader](load("llama-mha"), tmp_path)
    torch.testing.assert_close(model(input_ids).logits, expected)


def _edit_tensors(edit):
    def apply(path):
        tensors = load_file(path / ADAPTER_FILE)
        edit(tensors)
        save_file(tensors, path / ADAPTER_FILE)

    return apply


def _key(tensors, suffix):
    return next(k for k in tensors if k.endswith(suffix))


def _set(suffix, change):
    return _edit_tensors(lambda t: t.update({_key(t, suffix): change(t[_key(t, suffix)])}))


def _negative(indices):
    indices = indices.clone()
    indices[0] = -1
    return indices


def _duplicate(indices):
    indices = indices.clone()
    indices[1] = indices[0]
    return indices


def _nan(delta):
    delta = delta.clone()
    delta[0, 0] = float("nan")
    return delta


def _truncate(path):
    data = (path / ADAPTER_FILE).read_bytes()
    (path / ADAPTER_FILE).write_bytes(data[: len(data) // 2])


class _Payload:
    """Unpickling this runs a command: the marker file proves whether anything executed it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle(path):
    (path / ADAPTER_FILE).unlink()
    (path / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Payload(path / "EXECUTED")}))


DOWN_1 = "layers.1.mlp.down_proj.s2ft_"
O_0 = "layers.0.self_attn.o_proj.s2ft_"
BAD_FILES = {
    "out of range": (_set(DOWN_1 + "indices", lambda i: i + 1000), r"layers\.1\.mlp\.down_proj.*up to"),
    "negative": (_set(DOWN_1 + "indices", _negative), r"layers\.1\.mlp\.down_proj.*from -1"),
    "float": (_set(DOWN_1 + "indices", lambda i: i.float()), r"layers\.1\.mlp\.down_proj.*dtype torch\.float32"),
    "duplicate": (_set(DOWN_1 + "indices", _duplicate), r"layers\.1\.mlp\.down_proj.*duplicate"),
    "wrong shape": (_set(O_0 + "delta", lambda d: d[:, :2].contiguous()), r"layers\.0\.self_attn\.o_proj.*shape"),
    "non-finite": (_set(O_0 + "delta", _nan), r"layers\.0\.self_attn\.o_proj.*non-finite"),
    "truncated": (_truncate, "not a complete safetensors file"),
    "pickle that runs code": (_pickle, "pickle holding objects other than tensors.*nothing in it was executed"),
}


@pytest.mark.parametrize("bad", list(BAD_FILES))
@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("loader", list(LOADERS))
def test_a_bad_file_is_refused_and_the_model_left_as_it_was(load, input_ids, tmp_path, loader, permute, bad):
    corrupt, message = BAD_FILES[bad]
    _save_trained(load, input_ids, tmp_path, permute=permute, heads_per_layer=2, channels_per_layer=3)
    corrupt(tmp_path)
    base = load("llama-mha")
    if loader == "PeftModel.load_adapter":  # loading into a model that already has an adapter
        base = get_peft_model(base, S2FTConfig(task_type="CAUSAL_LM", seed=7, heads_per_layer=1))
        before = model_snapshot(base)
        with pytest.raises(AdapterMismatchError, match=message):
            base.load_adapter(tmp_path, adapter_name="loaded")
        assert list(base.peft_config) == ["default"]
    else:
        before = model_snapshot(base)
        with pytest.raises(AdapterMismatchError, match=message):
            LOADERS[loader](base, tmp_path)
    assert not (tmp_path / "EXECUTED").exists()
    assert_same_snapshot(before, model_snapshot(base))
    if loader != "PeftModel.load_adapter":
        assert not any(isinstance(m, S2FTLayer) for m in base.modules())


@pytest.mark.parametrize("loader", list(LOADERS))
def test_a_pickled_adapter_of_plain_tensors_still_loads(load, input_ids, tmp_path, loader):
    # save_pretrained(safe_serialization=False) writes adapter_model.bin; torch's weights-only unpickler reads it.
    model = get_peft_model(load("llama-mha"), S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=3))
    expected = model(input_ids).logits
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / ADAPTER_FILE).exists()
    torch.testing.assert_close(LOADERS[loader](load("llama-mha"), tmp_path)(input_ids).logits, expected)


def test_a_refused_transformers_load_leaves_the_models_other_adapters_registered_as_they_were(load, tmp_path):
    first, refused = tmp_path / "first", tmp_path / "refused"
    get_peft_model(load("llama-mha"), S2FTConfig(task_type="CAUSAL_LM", init_weights=False)).save_pretrained(first)
    get_peft_model(load("llama-mha"), S2FTConfig(task_type="CAUSAL_LM", permute=True)).save_pretrained(refused)
    model = load("llama-mha")
    model.load_adapter(str(first), adapter_name="first")
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="single adapter per model"):
        model.load_adapter(str(refused), adapter_name="refused")
    assert list(model.peft_config) == ["first"]
    assert_same_snapshot(before, model_snapshot(model))


def test_loading_a_file_with_fewer_layers_over_an_adapter_keeps_every_layers_active_adapter(load, input_ids, tmp_path):
    config = S2FTConfig(task_type="CAUSAL_LM", init_weights=False, layers_to_transform=[0], seed=2)
    saved = get_peft_model(load("llama-mha"), config)
    saved.save_pretrained(tmp_path)
    model = get_peft_model(load("llama-mha"), S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=0))
    model.add_adapter("other", S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=1))
    model.load_adapter(tmp_path, adapter_name="default")
    layers = [m for m in model.modules() if isinstance(m, S2FTLayer)]
    assert {tuple(m.active_adapters) for m in layers} <= {("default",), ()}
    assert not any(m.s2ft_delta["other"].requires_grad for m in layers if "other" in m.s2ft_delta)
    torch.testing.assert_close(model(input_ids).logits, saved(input_ids).logits)


@pytest.mark.parametrize("permute", [False, True])
def test_loading_over_a_merged_adapter_is_refused_with_nothing_changed(load, tmp_path, permute):
    get_peft_model(load("llama-mha"), S2FTConfig(task_type="CAUSAL_LM", seed=1, permute=permute)).save_pretrained(
        tmp_path
    )
    model = get_peft_model(load("llama-mha"), S2FTConfig(task_type="CAUSAL_LM", init_weights=False, permute=permute))
    model.merge_adapter()
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="merged into the base weights.*unmerge_adapter"):
        model.load_adapter(tmp_path, adapter_name="default")
    state = {k: v.clone() for k, v in model.state_dict().items() if "s2ft_" in k}
    with pytest.raises(ValueError, match="merged into the base weights"):
        model.load_state_dict(state, strict=False)
    assert_same_snapshot(before, model_snapshot(model))


def test_torch_load_state_dict_checks_every_layer_before_copying_any(load):
    torch.manual_seed(1)  # same selection as the model below, other delta values
    source = get_peft_model(load("llama-mha"), S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=0))
    state = {k: v.clone() for k, v in source.state_dict().items() if "s2ft_" in k}
    bad = next(k for k in state if "layers.1.mlp.down_proj.s2ft_indices" in k)
    state[bad] = state[bad] + 1000
    torch.manual_seed(2)
    model = get_peft_model(load("llama-mha"), S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=0))
    before = model_snapshot(model)
    with pytest.raises(AdapterMismatchError, match=r"layers\.1\.mlp\.down_proj"):
        model.load_state_dict(state, strict=False)
    assert_same_snapshot(before, model_snapshot(model))  # layer 0's good tensors were not copied either
    other = next(k for k in state if "layers.1.self_attn.o_proj.s2ft_indices" in k)
    other_delta = other.replace("s2ft_indices", "s2ft_delta")
    state[bad] = state[bad] - 1000
    state[other], state[other_delta] = state[other].flip(0), state[other_delta].flip(1)  # same units, other order
    model.load_state_dict(state, strict=False)
    for name, layer in model.named_modules():
        if isinstance(layer, S2FTLayer):
            dense = layer.get_delta_weight("default")
            expected = source.get_submodule(name).get_delta_weight("default")
            torch.testing.assert_close(dense, expected)


def test_a_load_over_an_adapter_keeps_its_parameters_so_an_existing_optimizer_still_trains(load, input_ids, tmp_path):
    get_peft_model(load("llama-mha"), S2FTConfig(task_type="CAUSAL_LM", seed=5)).save_pretrained(tmp_path)
    model = get_peft_model(load("llama-mha"), S2FTConfig(task_type="CAUSAL_LM", seed=0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    model.load_adapter(tmp_path, adapter_name="default", is_trainable=True)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    before = model(input_ids).logits.detach()
    model(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    assert not torch.equal(model(input_ids).logits, before)


def test_a_config_read_from_a_folder_and_then_edited_gets_the_edited_selection(load, tmp_path):
    kwargs = dict(task_type="CAUSAL_LM", seed=5, heads_per_layer=2, channels_per_layer=4)
    get_peft_model(load("llama-mha"), S2FTConfig(**kwargs)).save_pretrained(tmp_path)
    unchanged = get_peft_model(load("llama-mha"), S2FTConfig.from_pretrained(tmp_path))
    edited_config = S2FTConfig.from_pretrained(tmp_path)
    edited_config.heads_per_layer, edited_config.train_up, edited_config.target_modules = 1, True, None
    edited = get_peft_model(load("llama-mha"), edited_config)
    widths = {n: b.numel() for n, b in edited.named_buffers() if "s2ft_indices" in n}
    assert any("up_proj" in n for n in widths) and all(w == 8 for n, w in widths.items() if "o_proj" in n)
    assert not any("up_proj" in n for n, _ in unchanged.named_buffers())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.update({k: v.round().long() for k, v in t.items() if k.endswith("delta")}), "dtype torch.int64"),
        (lambda t: [t.pop(k) for k in list(t)] and t.update({"unrelated.weight": torch.zeros(2)}), "no S2FT layer"),
    ],
)
def test_files_that_are_not_float_s2ft_adapters_are_refused(load, tmp_path, edit, message):
    get_peft_model(load("llama-mha"), S2FTConfig(task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    _edit_tensors(edit)(tmp_path)
    model = load("llama-mha")
    before = model_snapshot(model)
    with pytest.raises(AdapterMismatchError, match=message):
        PeftModel.from_pretrained(model, tmp_path)
    assert_same_snapshot(before, model_snapshot(model))
