"""The efficiency benchmark runs end to end on a tiny model and reports sane, deterministic figures.

Only quantities that do not depend on timing are asserted: bytes, FLOPs, parameter counts, ratios of
those. Wall time is checked for presence, never for value.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

# benchmarks/ is a folder of the repository, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.efficiency import main
from benchmarks.methods import METHODS

FIELDS = (
    "method", "model", "batch", "seq_len", "dtype", "device", "torch_version", "step_time_s", "saved_bytes",
    "peak_mem_bytes", "flops", "trainable_params", "adapter_bytes", "step_time_s_ratio", "saved_bytes_ratio",
    "peak_mem_bytes_ratio", "flops_ratio",
)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict[str, dict], Path, Path]:
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "results.json", out / "results.png"
    argv = [
        "--model",
        "tiny",
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--repeats",
        "1",
        "--output",
        str(json_path),
    ]
    try:
        import matplotlib  # noqa: F401

        argv += ["--plot", str(png_path)]
    except ImportError:
        pass
    # One thread: on a busy machine two OpenMP threads make this tiny run ten times slower.
    threads = torch.get_num_threads()
    try:
        records = main([*argv, "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    return {r["method"]: r for r in records}, json_path, png_path


def test_one_record_per_method_with_all_fields(run):
    by_method, json_path, _ = run
    assert list(by_method) == [m for m in METHODS if m != "lora-experts"]
    for record in by_method.values():
        assert set(FIELDS) <= set(record), set(FIELDS) - set(record)
        assert (record["model"], record["batch"], record["seq_len"]) == ("tiny", 2, 16)
        assert record["step_time_s"] > 0 and record["step_time_s_ratio"] > 0
        assert isinstance(record["machine"]["malloc_env"], dict) and "code_version" in record
        assert (record["model_type"], record["task_type"]) == ("llama", "CAUSAL_LM")
        assert list(record["skipped_methods"]) == ["lora-experts"]  # a dense model has no fused experts
    assert json.loads(json_path.read_text()) == list(by_method.values())


def test_limit_is_the_reference(run):
    limit = run[0]["limit"]
    assert limit["trainable_params"] == 0 and limit["adapter_bytes"] == 0
    for field in ("step_time_s_ratio", "saved_bytes_ratio", "peak_mem_bytes_ratio", "flops_ratio"):
        assert limit[field] == 1.0


def test_deterministic_figures_are_sane(run):
    by_method = run[0]
    limit, full = by_method["limit"], by_method["full"]
    for record in by_method.values():
        # Every method back-propagates through the whole network: limit is a lower bound.
        assert record["saved_bytes"] >= limit["saved_bytes"] > 0
        assert record["flops"] >= limit["flops"] > 0
        assert record["peak_mem_bytes"] >= record["resident_bytes"] > 0
    assert full["adapter_bytes"] > by_method["lora"]["adapter_bytes"] > 0
    assert full["trainable_params"] > by_method["lora-all"]["trainable_params"]


def test_s2ft_saves_less_than_lora_and_full(run):
    by_method = run[0]
    for s2ft in ("s2ft", "s2ft-permute"):
        record = by_method[s2ft]
        assert 0 < record["trainable_params"] < by_method["full"]["trainable_params"]
        assert record["adapter_bytes"] > 0
        for other in ("lora", "lora-all", "full"):
            assert record["saved_bytes"] <= by_method[other]["saved_bytes"], (s2ft, other)
        assert record["peak_mem_bytes"] < by_method["full"]["peak_mem_bytes"]


def test_lora_rank_matches_the_s2ft_budget(run):
    by_method = run[0]
    budget = by_method["s2ft"]["trainable_params"]
    for lora in ("lora", "lora-all"):
        record = by_method[lora]
        assert record["lora_rank"] >= 1
        assert budget / 2 <= record["trainable_params"] <= budget * 2 or record["lora_rank"] == 1


def test_plot_is_written(run):
    pytest.importorskip("matplotlib")
    assert run[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_methods_that_write_weights_get_their_own_copy():
    from benchmarks.methods import copy_for
    from benchmarks.models import load_base_model

    base = load_base_model("tiny", torch.float32).requires_grad_(False)
    weight = base.model.layers[0].mlp.down_proj.weight
    for method in METHODS:
        copied = copy_for(method, base).model.layers[0].mlp.down_proj.weight
        assert (copied is weight) == (method not in ("full", "s2ft-permute")), method
        assert torch.equal(copied, weight)


# Other families: a Conv1D decoder, an encoder with a classification head and loss, a mixture of experts.
FAMILY_MODELS = ("tiny-gpt2", "tiny-bert", "tiny-mixtral")
SKIPPED = {"tiny-gpt2": {"lora-experts"}, "tiny-bert": {"lora-experts"}, "tiny-mixtral": {"s2ft-permute"}}


@pytest.fixture(scope="module")
def family_run() -> dict[str, dict[str, dict]]:
    argv = ["--model", ",".join(FAMILY_MODELS), "--batch", "2", "--seq-len", "16", "--repeats", "1"]
    threads = torch.get_num_threads()
    try:
        records = main([*argv, "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    found: dict[str, dict[str, dict]] = {}
    for record in records:
        found.setdefault(record["model"], {})[record["method"]] = record
    return found


def test_each_family_measures_its_methods_and_says_which_it_skipped(family_run):
    assert list(family_run) == list(FAMILY_MODELS)
    for model, by_method in family_run.items():
        assert list(by_method) == [m for m in METHODS if m not in SKIPPED[model]], model
        for record in by_method.values():
            assert set(FIELDS) <= set(record), set(FIELDS) - set(record)
            assert set(record["skipped_methods"]) == SKIPPED[model]
    assert "mixture-of-experts" in family_run["tiny-mixtral"]["limit"]["skipped_methods"]["s2ft-permute"]
    assert family_run["tiny-bert"]["limit"]["task_type"] == "SEQ_CLS"
    assert family_run["tiny-gpt2"]["limit"]["model_type"] == "gpt2"


def test_family_figures_are_sane(family_run):
    for model, by_method in family_run.items():
        limit, s2ft = by_method["limit"], by_method["s2ft"]
        assert limit["saved_bytes_ratio"] == limit["flops_ratio"] == 1.0
        budget = s2ft["trainable_params"]
        for method, record in by_method.items():
            assert record["saved_bytes"] >= limit["saved_bytes"] > 0, (model, method)
            assert record["flops"] >= limit["flops"] > 0, (model, method)
            if method.startswith("lora"):
                # Ranks are matched on the whole trainable count (GPT-2's Conv1D, BERT's classifier, per expert).
                assert budget / 2 <= record["trainable_params"] <= budget * 2 or record["lora_rank"] == 1
                assert s2ft["saved_bytes"] <= record["saved_bytes"], (model, method)
        assert 0 < budget < by_method["full"]["trainable_params"]


def test_moe_lora_on_the_experts_saves_more_than_s2ft(family_run):
    by_method = family_run["tiny-mixtral"]
    assert by_method["s2ft"]["saved_bytes"] < by_method["lora-experts"]["saved_bytes"]


def test_fused_experts_flops_are_counted(family_run):
    from benchmarks.models import RANDOM_SHAPES

    # The experts run as `_grouped_mm`, which torch's FLOP counter does not know; uncounted, the limit's FLOPs
    # would be below those of the routed rows' expert matmuls alone (forward and input gradient).
    config = RANDOM_SHAPES["tiny-mixtral"].config
    rows = 2 * 16 * config["num_experts_per_tok"]
    experts = 2 * 2 * rows * 3 * config["hidden_size"] * config["intermediate_size"] * config["num_hidden_layers"]
    assert family_run["tiny-mixtral"]["limit"]["flops"] > experts


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed ([quant])")
def test_quantized_methods_run_on_an_nf4_copy_and_compare_with_the_quantized_limit():
    threads = torch.get_num_threads()
    try:
        argv = ["--model", "tiny", "--batch", "2", "--seq-len", "16", "--repeats", "1", "--threads", "1"]
        records = main([*argv, "--methods", "s2ft,qlimit,qlora,qs2ft"])
    finally:
        torch.set_num_threads(threads)
    by_method = {r["method"]: r for r in records}
    assert list(by_method) == ["s2ft", "qlimit", "qlora", "qs2ft"]
    assert by_method["s2ft"]["step_time_s_ratio"] is None  # no float `limit` in this run
    assert all(by_method["qlimit"][f] == 1.0 for f in ("step_time_s_ratio", "saved_bytes_ratio"))
    # the same budget on the 4-bit base; QLoRA's rank matched to it
    assert by_method["qs2ft"]["trainable_params"] == by_method["s2ft"]["trainable_params"]
    assert by_method["qlora"]["lora_rank"] >= 1
    # 4-bit storage: the quantized trainees hold less than the float one
    assert by_method["qs2ft"]["resident_bytes"] < by_method["s2ft"]["resident_bytes"]
    assert by_method["qs2ft"]["saved_bytes"] <= by_method["qlora"]["saved_bytes"]
