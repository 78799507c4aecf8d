"""The serving benchmark runs end to end on the tiny random Llama (`--quick`) and checks what it times.

Only structure and correctness are asserted (the outputs each timed call is checked against, bit-exact restores);
times are checked for presence, never for value. A feature S2FT does not have yet may be recorded as skipped, with
the reason; nothing may be recorded as failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

# benchmarks/ is a folder of the repository, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import serving

QUICK_COUNTS = [int(k) for k in serving.QUICK["adapters"].split(",")]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("serving")
    argv = ["--quick", "--output-dir", str(out), "--report", str(out / "serving.md")]
    try:
        import matplotlib  # noqa: F401

        argv += ["--plot", str(out / "serving.png")]
    except ImportError:
        pass
    # One thread: on a busy machine two OpenMP threads make this tiny run much slower.
    threads = torch.get_num_threads()
    try:
        records = serving.main([*argv, "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert len(records) == 1
    return records[0], out


def _timed_or_skipped(entry: dict, feature: str) -> bool:
    """True when timed; a skip must say the feature is missing."""
    if "skipped" in entry:
        assert serving._NOT_YET.search(entry["skipped"]), (feature, entry)
        return False
    assert entry["median_s"] > 0 and len(entry["times_s"]) == serving.QUICK["repeats"], (feature, entry)
    return True


def test_nothing_failed_and_the_record_is_written(run):
    record, out = run
    assert serving.failures(record, record["model"]) == []
    path = serving.record_path(out, "tiny")
    assert path.name == "serving-tiny.json" and json.loads(path.read_text()) == record
    assert record["model"] == "tiny" and record["batch"] == serving.QUICK["batch"]
    assert record["seq_len"] == serving.QUICK["seq_len"] and record["decode_tokens"] == serving.QUICK["decode_tokens"]
    assert "code_version" in record and isinstance(record["library_changes"], list)
    assert record["adapters_loaded"] == max(QUICK_COUNTS)


def test_shape_and_matched_adapters(run):
    record, _ = run
    shape = record["shape"]
    assert (shape["num_hidden_layers"], shape["hidden_size"], shape["intermediate_size"]) == (2, 64, 256)
    assert (shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]) == (4, 2, 16)
    s2ft, lora = record["methods"]["s2ft"], record["methods"]["lora"]
    assert s2ft["selections_differ"] and s2ft["adapted_modules"] > 0 and s2ft["max_selected"] > 0
    budget = s2ft["trainable_per_adapter"]
    assert lora["rank"] >= 1 and (budget / 2 <= lora["trainable_per_adapter"] <= 2 * budget or lora["rank"] == 1)


def test_switches_are_checked_and_timed(run):
    switch = run[0]["switch"]
    for method in serving.METHODS:
        merged = switch["merged"][method]
        assert _timed_or_skipped(merged, f"{method} merged switch")
        assert merged["check"]["max_abs_diff"] <= merged["check"]["tolerance"]
        assert merged["per_module_s"] > 0
    # S2FT unmerges by copy: after every switch the base weights are back bit for bit.
    assert switch["merged"]["s2ft"]["restored_bit_exact"] and switch["merged"]["s2ft"]["max_weight_drift"] == 0.0
    assert switch["merged_speedup"] > 0
    # S2FT's set_adapter alone switches a merged model (what is merged changes, bit-exact).
    one_call = switch["merged_set_adapter"]["s2ft"]
    if _timed_or_skipped(one_call, "s2ft merged set_adapter"):
        assert one_call["still_merged"] and one_call["check"]["max_abs_diff"] <= one_call["check"]["tolerance"]
    assert _timed_or_skipped(switch["hotswap"]["lora"], "lora hotswap")
    for method in serving.METHODS:
        entry = switch["hotswap"][method]
        if _timed_or_skipped(entry, f"{method} hotswap"):
            assert entry["check"]["max_abs_diff"] <= entry["check"]["tolerance"]
    # S2FT also swaps a merged adapter (PEFT's LoRA hotswap refuses to), restoring the base by copy afterwards.
    merged_swap = switch["hotswap_merged"]["s2ft"]
    if _timed_or_skipped(merged_swap, "s2ft merged hotswap"):
        assert merged_swap["check"]["max_abs_diff"] <= merged_swap["check"]["tolerance"]
        assert merged_swap["restored_bit_exact"]


def test_mixed_batches_agree_with_per_row_single_adapter_outputs(run):
    mixed = run[0]["mixed"]
    assert [int(k) for k in mixed] == QUICK_COUNTS
    for k, entries in mixed.items():
        assert entries["rows"] == serving.QUICK["batch"]
        for method in serving.METHODS:
            entry = entries[method]
            if "skipped" in entry:
                assert method == "s2ft" and serving._NOT_YET.search(entry["skipped"]), entry
                continue
            for check in ("check", "check_decode"):
                assert entry[check]["max_abs_diff"] < 1e-4, (k, method, check)
            assert entry["check"]["adapter_effect"] >= serving.EFFECT * entry["check"]["tolerance"]
            for phase, steps in (("prefill", serving.QUICK["seq_len"]), ("decode", serving.QUICK["decode_tokens"])):
                assert entry[phase]["median_s"] > 0
                tokens = entry[phase]["tokens_per_s"] * entry[phase]["median_s"]
                assert tokens == pytest.approx(serving.QUICK["batch"] * steps)
        for phase in ("prefill", "decode"):
            assert entries["base"][phase]["median_s"] > 0 and entries[f"{phase}_floor"] > 0
            assert "overhead" in entries["lora"][phase]
            if "check" in entries["s2ft"]:
                assert entries[f"{phase}_ratio"] > 0 and "overhead" in entries["s2ft"][phase]


def test_unmerged_inference_against_the_base(run):
    unmerged = run[0]["unmerged"]
    for name in ("base", *serving.METHODS):
        for phase in ("prefill", "decode"):
            assert unmerged[name][phase]["median_s"] > 0
    for method in serving.METHODS:
        assert unmerged[method]["check_disabled"]["max_abs_diff"] <= unmerged[method]["check_disabled"]["tolerance"]
        assert "overhead" in unmerged[method]["prefill"] and "overhead" in unmerged[method]["decode"]
    assert isinstance(unmerged["prefill_s2ft_overhead_minus_lora"], float)


def test_fusion_is_timed_and_exact_where_it_exists(run):
    fusion = run[0]["fusion"]
    assert fusion["lora"]["combination_type"] == "cat"
    assert _timed_or_skipped(fusion["lora"], "lora fusion")
    assert fusion["lora"]["max_abs_diff"] < 1e-4 and fusion["lora"]["exact_within_tolerance"]
    if _timed_or_skipped(fusion["s2ft"], "s2ft fusion"):
        assert fusion["s2ft"]["max_abs_diff"] < 1e-4


def test_export_to_lora_is_exact(run):
    record = run[0]
    entry = record["export"]["s2ft"]
    if "skipped" in entry:
        assert serving._NOT_YET.search(entry["skipped"]), entry
        return
    assert entry["check"]["max_abs_diff"] <= entry["check"]["tolerance"]
    # The exact LoRA of a delta on |S| columns has rank |S|; for vLLM every module is padded to one allowed rank.
    assert entry["vllm_rank"] == entry["lora_rank"] >= record["methods"]["s2ft"]["max_selected"]
    assert entry["lora_file_bytes"] > 0 and entry["s2ft_file_bytes"] > 0


def test_targets_report_and_plot(run):
    record, out = run
    assert {t["target"].split(":")[0] for t in record["targets"]} >= {"unmerged prefill", "unmerged decode"}
    assert all(t["met"] in (True, False, None) for t in record["targets"])
    width_target = record["targets"][0]
    assert width_target["met"] is None  # hidden 64: the switch target applies from 2048 on
    report = (out / "serving.md").read_text()
    start, end = serving.MARKERS
    assert report.count(start) == report.count(end) == 1
    tables = report[report.index(start) + len(start) : report.index(end)].strip()
    assert tables == serving.format_tables(serving.load_records(out))
    for title in ("Models and adapters", "Switching adapters", "Mixed-adapter batches", "Fusing two adapters"):
        assert title in tables
    # Regenerating from the records rewrites the block in place.
    serving.write_report(out / "serving.md", tables)
    assert (out / "serving.md").read_text() == report
    if (out / "serving.png").exists():
        assert (out / "serving.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_mixed_batch_check_catches_a_wrong_row_assignment():
    base = serving.load_base("tiny", torch.float32, seed=0)
    names = serving.adapter_names(2)
    served = serving.build_lora(base, names, budget=2000)
    ids = torch.randint(0, base.config.vocab_size, (4, 6), generator=torch.Generator().manual_seed(0))
    rows = [names[i % 2] for i in range(4)]
    out = serving.logits(served.model, ids, adapter_names=rows)
    serving.compare(out, serving.per_row_reference(served, ids, rows, serving.logits), "right rows")
    with pytest.raises(serving.CheckFailed):
        serving.compare(out, serving.per_row_reference(served, ids, rows[::-1], serving.logits), "wrong rows")
