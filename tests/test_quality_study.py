"""benchmarks/quality.py: the study's pipeline on a tiny Llama (every method, resume, report) and its parts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_chat import save_tiny_llama
from transformers import AutoModelForCausalLM

# benchmarks/ is a folder of the repository, not part of the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import quality, sorsa  # noqa: E402


def _records(path: Path) -> dict[str, dict]:
    return {r["id"]: r for r in json.loads(path.read_text())["records"]}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("quality") / "tiny")


@pytest.mark.slow
def test_quick_study_runs_every_method_resumes_and_reports(tiny_model, tmp_path, capsys):
    output, work = tmp_path / "quality.json", tmp_path / "work"
    argv = ["--quick", "--model", str(tiny_model), "--output", str(output), "--work-dir", str(work), "--threads", "1"]
    assert quality.main(argv) == 0
    records = _records(output)
    methods, rates, seeds = quality.METHODS, (1e-3, 3e-3), (0, 1)
    expected = {"data", "reference/forgetting", "eval/base"}
    expected |= {f"train/{m}/lr{lr:g}/seed0" for m in methods for lr in rates}
    chosen = {m: records[f"choice/{m}"]["learning_rate"] for m in methods}
    expected |= {f"choice/{m}" for m in methods} | {quality.eval_id(m, chosen[m], s) for m in methods for s in seeds}
    expected |= {f"train/{m}/lr{chosen[m]:g}/seed1" for m in methods}
    assert set(records) == expected

    data = records["data"]
    assert data["shared_train_test"] == data["shared_val_test"] == data["shared_train_val"] == 0
    for method in methods:  # the choice is the grid's lowest validation loss, on seed 0
        losses = {lr: records[f"train/{method}/lr{lr:g}/seed0"]["val_loss"] for lr in rates}
        assert chosen[method] == min(losses, key=losses.__getitem__)
    # Matched budgets: LoRA and PiSSA share the rank; SORSA adds its r singular values per layer.
    lora, pissa, sorsa_run = (records[f"train/{m}/lr{chosen[m]:g}/seed0"] for m in ("lora", "pissa", "sorsa"))
    assert lora["trainable_params"] == pissa["trainable_params"] < sorsa_run["trainable_params"]
    full = records[f"train/full/lr{chosen['full']:g}/seed0"]
    assert full["trainable_params"] == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters()
    )
    # The base model is its own reference; full fine-tuning at these rates moves it.
    assert records["eval/base"]["forgetting_kl"] == pytest.approx(0.0, abs=1e-6)
    assert records[quality.eval_id("full", chosen["full"], 0)]["forgetting_kl"] > 1e-6
    assert all(len(r["in_domain"]["per_problem"]) == 3 for r in records.values() if r["kind"] == "eval")

    # A re-run does nothing; a missing evaluation whose snapshot is gone retrains exactly that run.
    assert quality.main(argv) == 0
    assert _records(output) == records
    key = f"train/s2ft/lr{chosen['s2ft']:g}/seed1"
    quality.Study.snapshot_path_for(work, key).unlink()
    stored = json.loads(output.read_text())
    lost = quality.eval_id("s2ft", chosen["s2ft"], 1)
    stored["records"] = [r for r in stored["records"] if r["id"] != lost]
    output.write_text(json.dumps(stored))
    assert quality.main(argv) == 0
    rerun = _records(output)
    assert rerun[key]["finished"] >= records[key]["finished"] and lost in rerun
    assert {k: v for k, v in rerun.items() if k not in (key, lost)} == {
        k: v for k, v in records.items() if k not in (key, lost)
    }

    capsys.readouterr()
    assert quality.main([*argv, "--report", "--plot", str(tmp_path / "q.png")]) == 0
    table = capsys.readouterr().out
    assert f"{len(methods)} methods complete of {len(methods)}" in table
    assert all(f"| {m} | " in table for m in methods) and (tmp_path / "q.png").stat().st_size > 0


def test_a_widened_grid_keeps_the_runs_and_remakes_the_choice(tiny_model, tmp_path):
    output, work = tmp_path / "quality.json", tmp_path / "work"
    argv = ["--quick", "--model", str(tiny_model), "--output", str(output), "--work-dir", str(work)]
    argv += ["--methods", "s2ft", "--seeds", "0", "--threads", "1"]
    assert quality.main([*argv, "--learning-rates", "1e-3,3e-3"]) == 0
    before = _records(output)
    # A rate that wins on validation whatever the grid (the tiny model's loss falls with the rate here).
    assert quality.main([*argv, "--learning-rates", "1e-3,3e-3,3e-1"]) == 0
    after = _records(output)
    assert set(after) - set(before) == {"train/s2ft/lr0.3/seed0", quality.eval_id("s2ft", 0.3, 0)}
    assert all(after[k] == before[k] for k in before if not k.startswith("choice/"))
    assert after["choice/s2ft"]["grid"] == [1e-3, 3e-3, 0.3] and after["choice/s2ft"]["learning_rate"] == 0.3
    with pytest.raises(SystemExit, match="other settings"):  # narrowing (or any other change) is not resumed
        quality.main([*argv, "--learning-rates", "1e-3"])


def test_ladder_steps_follow_the_one_three_ladder():
    assert [quality.ladder_step(lr, up=True) for lr in (1e-4, 3e-4, 1e-2, 3e-2, 0.5)] == [3e-4, 1e-3, 3e-2, 0.1, 1.5]
    assert [quality.ladder_step(lr, up=False) for lr in (1e-4, 3e-4, 1e-2, 0.3)] == [3e-5, 1e-4, 3e-3, 0.1]


@pytest.mark.parametrize(
    ("losses", "steps", "grid"),
    [
        ({}, 2, [1e-3, 3e-3]),  # nothing trained yet: the base grid
        ({1e-3: 2.0, 3e-3: 1.0}, 2, [1e-3, 3e-3, 1e-2]),  # the top edge wins: one step up
        ({1e-3: 2.0, 3e-3: 1.0, 1e-2: 0.5}, 2, [1e-3, 3e-3, 1e-2, 3e-2]),
        ({1e-3: 2.0, 3e-3: 1.0, 1e-2: 0.5, 3e-2: 0.4}, 2, [1e-3, 3e-3, 1e-2, 3e-2]),  # at most 2 steps a side
        ({1e-3: 2.0, 3e-3: 1.0, 1e-2: 1.5}, 2, [1e-3, 3e-3, 1e-2]),  # interior best: final
        ({1e-3: 2.0, 3e-3: 1.0, 1e-2: None}, 2, [1e-3, 3e-3, 1e-2]),  # diverged above the best: final
        ({1e-3: 1.0, 3e-3: 2.0}, 2, [3e-4, 1e-3, 3e-3]),  # the bottom edge wins: one step down
        ({1e-3: 1.0, 3e-3: 2.0}, 0, [1e-3, 3e-3]),  # no steps allowed
        ({1e-3: None, 3e-3: None}, 2, [1e-3, 3e-3]),  # all diverged: nothing to extend towards
    ],
)
def test_the_grid_grows_past_a_winning_edge_only(losses, steps, grid):
    assert quality.search_grid([3e-3, 1e-3], losses, steps) == grid


def test_a_winning_edge_grows_the_grid_and_an_older_file_resumes(tiny_model, tmp_path):
    output, work = tmp_path / "quality.json", tmp_path / "work"
    argv = ["--quick", "--model", str(tiny_model), "--output", str(output), "--work-dir", str(work)]
    argv += ["--methods", "s2ft", "--seeds", "0", "--threads", "1", "--learning-rates", "1e-3,3e-3"]
    assert quality.main(argv) == 0
    before = _records(output)
    # A file made before the edge search existed (no grid_edge_steps setting) resumes with it.
    stored = json.loads(output.read_text())
    del stored["settings"]["grid_edge_steps"]
    output.write_text(json.dumps(stored))
    assert quality.main([*argv, "--grid-edge-steps", "1"]) == 0
    after = _records(output)
    losses = {lr: after[f"train/s2ft/lr{lr:g}/seed0"]["val_loss"] for lr in (1e-3, 3e-3, 1e-2)}
    # The tiny model's validation loss falls with the rate here, so the top edge wins and the grid grows once.
    assert losses[3e-3] < losses[1e-3] and before["choice/s2ft"]["learning_rate"] == 3e-3
    assert after["choice/s2ft"]["grid"] == [1e-3, 3e-3, 1e-2]
    assert after["choice/s2ft"]["learning_rate"] == min(losses, key=losses.__getitem__)
    assert all(after[k] == before[k] for k in before if not k.startswith("choice/"))


def test_the_report_of_an_unfinished_study_shows_the_finished_methods(tiny_model, tmp_path, capsys):
    output, work = tmp_path / "quality.json", tmp_path / "work"
    argv = ["--quick", "--model", str(tiny_model), "--output", str(output), "--work-dir", str(work)]
    assert quality.main([*argv, "--methods", "s2ft,lora", "--seeds", "0", "--threads", "1"]) == 0
    stored = json.loads(output.read_text())  # as if the study had stopped inside LoRA's grid
    stored["records"] = [r for r in stored["records"] if not r["id"].startswith(("choice/lora", "eval/lora"))]
    output.write_text(json.dumps(stored))
    capsys.readouterr()
    assert quality.main(["--report", "--output", str(output)]) == 0
    table = capsys.readouterr().out
    assert "1 methods complete of 2" in table and "| s2ft | " in table and "| lora | " not in table


def test_other_settings_are_not_resumed(tiny_model, tmp_path):
    output = tmp_path / "quality.json"
    output.write_text(json.dumps({"format": 1, "settings": {"max_steps": 999}, "records": []}))
    with pytest.raises(SystemExit, match="other settings"):
        quality.main(["--quick", "--model", str(tiny_model), "--output", str(output), "--methods", "s2ft"])


def _pissa_model(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa")
    return get_peft_model(model, config)


def test_sorsa_refactors_pissa_exactly_and_trains_its_singular_values(tiny_model):
    model = _pissa_model(tiny_model)
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert sorsa.to_sorsa(model) == 2 * 2  # q_proj and down_proj of two layers
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    # The factors start orthonormal; the singular values are trainable parameters that get gradients.
    assert float(sorsa.orthonormal_penalty(model)) < 1e-4
    values = [p for n, p in model.named_parameters() if n.endswith(sorsa.SINGULAR_VALUES)]
    assert len(values) == 4 and all(p.requires_grad for p in values)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in values)
    with torch.no_grad():  # the penalty measures the distance from orthonormality
        next(p for n, p in model.named_parameters() if "lora_A" in n).mul_(2.0)
    assert float(sorsa.orthonormal_penalty(model)) > 1.0


def test_sorsa_refuses_models_without_lora(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with pytest.raises(ValueError, match="no LoRA layer"):
        sorsa.to_sorsa(model)
    with pytest.raises(ValueError, match="no SORSA layer"):
        sorsa.orthonormal_penalty(model)


def test_kl_and_nll_match_a_direct_computation(tiny_model):
    from peft_s2ft.train.task import IGNORE_INDEX

    reference = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tuned = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        tuned.lm_head.weight.add_(0.05 * torch.randn_like(tuned.lm_head.weight))
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "attention_mask": [1] * 5, "labels": [IGNORE_INDEX] * 2 + [7, 8, 9]},
        {"input_ids": [10, 11, 12], "attention_mask": [1] * 3, "labels": [IGNORE_INDEX, 11, 12]},
    ]
    kl, nll = quality._mean_kl_and_nll(tuned, reference, rows)
    kls, nlls = [], []
    with torch.no_grad():
        for row in rows:  # one unpadded sequence at a time: positions t predict token t + 1
            ids = torch.tensor([row["input_ids"]])
            p = torch.log_softmax(reference(input_ids=ids).logits[0], -1)
            q = torch.log_softmax(tuned(input_ids=ids).logits[0], -1)
            for t, label in enumerate(row["labels"][1:]):
                if label != IGNORE_INDEX:
                    kls.append(float((p[t].exp() * (p[t] - q[t])).sum()))
                    nlls.append(float(-q[t, label]))
    assert kl == pytest.approx(sum(kls) / len(kls), rel=1e-4) and kl > 0
    assert nll == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert quality._mean_kl_and_nll(reference, reference, rows)[0] == pytest.approx(0.0, abs=1e-7)


def test_restore_needs_exactly_the_trainable_tensors(tiny_model):
    sizes = {"s2ft_params": 0}
    first = quality.build("s2ft", AutoModelForCausalLM.from_pretrained(tiny_model), 0, sizes, None)
    state = {k: torch.full_like(v, 0.5) for k, v in quality.trainable_state(first).items()}
    second = quality.build("s2ft", AutoModelForCausalLM.from_pretrained(tiny_model), 0, sizes, None)
    quality.restore(second, state)
    assert all(torch.equal(v, state[k]) for k, v in quality.trainable_state(second).items())
    with pytest.raises(RuntimeError, match="disagree"):
        quality.restore(second, {**state, "extra.weight": torch.zeros(1)})
