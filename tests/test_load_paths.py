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
