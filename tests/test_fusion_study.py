"""benchmarks/fusion.py --quick end to end on a tiny random Llama: every run recorded, re-runs resume."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from tiny_chat import save_tiny_llama

# benchmarks/ is a folder of the repository, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import fusion  # noqa: E402

TASKS = "chain_sum,gcd"  # short prompts: the byte-level tokenizer makes one token per character


def _records(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in json.loads(path.read_text())["records"]}


@pytest.mark.slow
def test_quick_study_runs_resumes_and_reports(tmp_path, capsys):
    model = save_tiny_llama(tmp_path / "tiny")
    output, work = tmp_path / "fusion.json", tmp_path / "work"
    argv = ["--quick", "--model", str(model), "--output", str(output), "--work-dir", str(work)]
    argv += ["--tasks", TASKS, "--max-length", "512", "--test-samples", "3", "--threads", "1"]
    assert fusion.main(argv) == 0
    records = _records(output)
    adapters, pairs = fusion.study_plan(*TASKS.split(","))
    setups = ["base", "base-long", *(a.name for a in adapters)]
    setups += [fusion.fused_setup(p, c, (1.0, 1.0)) for p in pairs for c in p.combinations]
    expected = {f"eval/{s}/{t}" for s in setups for t in TASKS.split(",")}
    expected |= {f"train/{a.name}" for a in adapters} | {f"data/{t}" for t in TASKS.split(",")}
    expected |= {f"overlap/{p.name}" for p in pairs if p.s2ft}
    assert set(records) == expected

    assert all(records[f"data/{t}"]["train_test_shared_questions"] == 0 for t in TASKS.split(","))
    lora = records[f"train/lora-{TASKS.split(',')[0]}"]
    assert lora["config"]["rank"] >= 1 and lora["trainable_params"] > 0
    # S2FT's linear fusion and LoRA's cat are exact sums: the same logits as both adapters active together.
    for setup in ("fused:s2ft-same-selection:linear:1/1", "fused:s2ft-disjoint:linear:1/1", "fused:lora:cat:1/1"):
        assert records[f"eval/{setup}/gcd"]["fused_vs_sum_max_abs_logit_diff"] < 1e-4
    assert records["overlap/s2ft-same-selection"]["overlap"]["jaccard"] == 1.0
    assert records["overlap/s2ft-disjoint"]["overlap"]["shared"] == 0
    fused = [r for r in records.values() if r["kind"] == "eval" and r["setup"].startswith("fused:")]
    assert all(r["fused_reload_max_abs_logit_diff"] < 1e-4 for r in fused)

    # A re-run does nothing; a lost adapter folder is retrained only when a missing run needs it.
    assert fusion.main(argv) == 0
    assert _records(output) == records
    shutil.rmtree(work / "adapters" / "lora-gcd")
    assert fusion.main(argv) == 0
    assert _records(output) == records
    stored = json.loads(output.read_text())
    stored["records"] = [r for r in stored["records"] if r["id"] != "eval/fused:lora:cat:1/1/gcd"]
    output.write_text(json.dumps(stored))
    assert fusion.main(argv) == 0
    rerun = _records(output)
    changed = {k for k in rerun if rerun[k] != records.get(k)}
    assert changed == {"train/lora-gcd", "eval/fused:lora:cat:1/1/gcd"}

    # Another budget refuses to mix with these records.
    with pytest.raises(SystemExit, match="other settings"):
        fusion.main([*argv, "--max-steps", "3"])

    capsys.readouterr()
    assert fusion.main(["--report", "--output", str(output), "--quick", "--model", str(model)]) == 0
    table = capsys.readouterr().out
    assert "| s2ft-disjoint, linear 1/1 | gcd |" in table and "| lora, cat 1/1 | chain_sum |" in table
