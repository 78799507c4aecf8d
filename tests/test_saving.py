"""A save that fails or is killed halfway leaves the previous adapter where it was, loadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
from peft import PeftModel, get_peft_model

from peft_s2ft import S2FTConfig


def _adapter(load, seed: int):
    return get_peft_model(load("llama-gqa"), S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=seed))


def _half_then(action):
    """A safetensors writer that writes the first half of the real file, then fails with `action`."""
    real = safetensors.torch.serialize_file

    def serialize(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "rb") as handle:
            data = handle.read()
        with open(filename, "wb") as handle:
            handle.write(data[: len(data) // 2])
        action()

    return serialize


def _raise():
    raise OSError("disk full (simulated)")


def test_a_save_that_raises_midway_leaves_the_previous_adapter(load, input_ids, tmp_path, monkeypatch):
    old = _adapter(load, seed=0)
    old.save_pretrained(tmp_path)
    expected = old(input_ids).logits
    monkeypatch.setattr(safetensors.torch, "serialize_file", _half_then(_raise))
    with pytest.raises(OSError, match="simulated"):
        _adapter(load, seed=1).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    torch.testing.assert_close(PeftModel.from_pretrained(load("llama-gqa"), tmp_path)(input_ids).logits, expected)


def test_a_save_killed_midway_leaves_the_previous_adapter(load, model_dirs, input_ids, tmp_path):
    old = _adapter(load, seed=0)
    old.save_pretrained(tmp_path)
    expected = old(input_ids).logits
    script = textwrap.dedent(
        f"""
        import os, signal
        import safetensors.torch
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM
        import peft_s2ft
        real = safetensors.torch.serialize_file
        def serialize(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            data = open(filename, "rb").read()
            open(filename, "wb").write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        safetensors.torch.serialize_file = serialize
        model = AutoModelForCausalLM.from_pretrained({model_dirs["llama-gqa"]!r})
        config = peft_s2ft.S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=1)
        get_peft_model(model, config).save_pretrained({str(tmp_path)!r})
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    torch.testing.assert_close(PeftModel.from_pretrained(load("llama-gqa"), tmp_path)(input_ids).logits, expected)


def test_a_config_write_that_fails_leaves_the_previous_config(load, tmp_path, monkeypatch):
    import peft.config

    _adapter(load, seed=0).save_pretrained(tmp_path)
    before = (tmp_path / "adapter_config.json").read_text()

    def fail(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(peft.config.json, "dumps", fail)
    with pytest.raises(OSError, match="simulated"):
        S2FTConfig(task_type="CAUSAL_LM", seed=5).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "adapter_config.json").read_text() == before
    assert json.loads(before)["seed"] == 0
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


def test_transformers_save_of_an_injected_adapter_that_raises_midway_leaves_the_previous_one(
    load, input_ids, tmp_path, monkeypatch
):
    source = tmp_path / "source"
    _adapter(load, seed=0).save_pretrained(source)
    model = load("llama-gqa")
    model.load_adapter(str(source), adapter_name="default")
    expected = model(input_ids).logits
    model.save_pretrained(tmp_path / "saved")
    monkeypatch.setattr(safetensors.torch, "serialize_file", _half_then(_raise))
    with pytest.raises(OSError, match="simulated"):
        model.save_pretrained(tmp_path / "saved")
    monkeypatch.undo()
    reloaded = load("llama-gqa")
    reloaded.load_adapter(str(tmp_path / "saved"), adapter_name="default")
    torch.testing.assert_close(reloaded(input_ids).logits, expected)


def test_the_next_save_removes_what_a_killed_save_left_behind(load, tmp_path):
    model = _adapter(load, seed=0)
    model.save_pretrained(tmp_path)
    (tmp_path / ".adapter_model.safetensors.0123abcd.tmp").write_bytes(b"half")
    (tmp_path / ".s2ft-config-leftover").mkdir()
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
