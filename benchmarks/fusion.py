"""Does fusing two adapters keep both skills? S2FT against a parameter-matched LoRA on two reasoning-gym tasks.

For each of two tasks with short numeric answers the study trains, with the same data, steps, batch, schedule and
seed: an S2FT adapter (S2FTConfig default), a LoRA with the rank matched to S2FT's trainable parameter count, and
for the second task two more S2FT adapters, one with another selection seed and one whose selection is disjoint
from the first task's adapter (`S2FTConfig(disjoint_from=[...])`). It then evaluates every task (exact match of
the final number, batched greedy decoding) with the base model, each adapter alone, and each pair fused with
`add_weighted_adapter` (S2FT "linear"; LoRA "cat", its exact sum of deltas, and "linear").

The study is resumable: every finished run (data split, training, evaluation, overlap) is one JSON record in
`--output`, written as soon as it ends; a re-run skips what is recorded and does the rest (retraining an adapter
only if its folder is gone and a pending evaluation needs it). Runs that need a feature the installed peft_s2ft
lacks are skipped with a message, and the exit status is 3 until they are done.

    python benchmarks/fusion.py                       # the study on the embedded SmolLM2-135M-Instruct
    python benchmarks/fusion.py --report              # the markdown tables of docs/fusion.md from the records
    python benchmarks/fusion.py --quick               # the whole pipeline on a tiny budget, in minutes
    python benchmarks/fusion.py --quick --model DIR --output /tmp/f.json --work-dir /tmp/f
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Run as a script, the repository root is not on the path; as a module it already is.
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.study_records import Records, add_setting_options, code_version, fill_settings, jsonable, machine_state  # noqa: E402

# The part of a chat template (SmolLM2's, for one) that adds a default system turn when there is none.
DEFAULT_SYSTEM_TURN = re.compile(
    r"\{%-?\s*if loop\.first and messages\[0\]\['role'\] != 'system'\s*-?%\}.*?\{%-?\s*endif\s*-?%\}", re.S
)
EXIT_INCOMPLETE = 3
# reasoning-gym seeds item i with seed + i: the test split starts far away from the training items.
TEST_SEED_OFFSET = 1_000_003


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A reasoning-gym generator and its configuration; every answer is one integer."""

    dataset: str
    config: dict[str, Any]


TASKS: dict[str, TaskSpec] = {
    "chain_sum": TaskSpec("chain_sum", dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2)),
    "basic_arithmetic": TaskSpec(
        "basic_arithmetic",
        dict(
            min_terms=2,
            max_terms=3,
            min_digits=1,
            max_digits=2,
            operators=("+", "-", "*"),
            allow_parentheses=False,
            allow_negation=False,
        ),
    ),
    "leg_counting": TaskSpec("leg_counting", dict(min_animals=1, max_animals=3, min_instances=1, max_instances=5)),
    "gcd": TaskSpec("gcd", dict(max_value=100)),
    "letter_counting": TaskSpec("letter_counting", dict(min_words=3, max_words=6)),
    "number_sequence": TaskSpec(
        "number_sequence", dict(min_terms=4, max_terms=6, min_value=-20, max_value=20, max_complexity=1)
    ),
    "simple_equations": TaskSpec(
        "simple_equations",
        dict(min_terms=2, max_terms=2, max_value=20, operators=("+", "-"), operators_weights=[0.5, 0.5]),
    ),
}

# Settings that decide the results; a records file made with other values is not resumed.
FULL = dict(
    tasks="number_sequence,gcd",
    max_steps=48,
    batch_size=16,
    train_samples=None,  # one pass: max_steps x batch_size
    test_samples=300,
    max_length=256,
    max_new_tokens=None,  # longest training answer + 4 tokens
    long_new_tokens=64,
    eval_batch_size=50,
    seed=0,
    lr_s2ft=3e-3,
    lr_lora=1e-3,
    weights="1.0,0.5",
    system_prompt="none",  # "default": the chat template's own default system turn
)
QUICK = dict(FULL, max_steps=2, batch_size=4, test_samples=6, eval_batch_size=6, long_new_tokens=12, weights="1.0")
# Neither the batch of greedy decoding nor extra fusion weights change the other runs' results.
RESULT_KEYS = tuple(k for k in FULL if k not in ("eval_batch_size", "weights"))
CHECK_ROWS = 4  # prompts per task in the fused-versus-sum logit check


# --------------------------------------------------------------------------------------------------- data


def make_splits(spec: TaskSpec, train_size: int, test_size: int, seed: int, fits: Callable[[str, str], bool]) -> Any:
    """Seeded train and test splits of unique problems; no test question occurs in training."""
    from peft_s2ft.train.task import Split

    seen: set[str] = set()
    splits = []
    for size, start in ((train_size, seed), (test_size, seed + TEST_SEED_OFFSET)):
        splits.append(_draw(spec, size, start, seen, fits, Split))
    return splits[0], splits[1]


def _draw(
    spec: TaskSpec, size: int, seed: int, seen: set[str], fits: Callable[[str, str], bool], split_cls: Any
) -> Any:
    import reasoning_gym

    split = split_cls([], [], [])
    request, drawn = size, 0
    while len(split) < size:
        for item in reasoning_gym.create_dataset(spec.dataset, size=request, seed=seed, **spec.config):
            question, answer = item["question"], str(item["answer"])
            if question in seen or not fits(question, answer):
                continue
            seen.add(question)
            split.prompts.append(question)
            split.completions.append(answer)
            split.answers.append(answer)
            if len(split) == size:
                break
        drawn += request
        if drawn > 50 * size + 1000:
            raise SystemExit(f"{spec.dataset}: only {len(split)} unique problems in {drawn} drawn; need {size}.")
        seed += request
        request = max(2 * (size - len(split)), 16)
    return split


# -------------------------------------------------------------------------------------------------- study


def load_tokenizer(source: str, system_prompt: str) -> Any:
    """The model's tokenizer; with system_prompt "none" its chat template no longer adds a default system turn.

    SmolLM2-Instruct's template inserts "You are a helpful AI assistant named SmolLM..." (about 20 tokens) into
    every conversation without a system message: close to half of a short problem's tokens, and of a CPU step.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if system_prompt == "none" and getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_SYSTEM_TURN.sub("", tokenizer.chat_template, count=1)
    return tokenizer


def load_base(source: str) -> Any:
    """The base model in float32 (as `peft-s2ft train` trains it), in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """One adapter to train: its method, task and config changes from the default."""

    name: str
    method: str  # "s2ft" or "lora"
    task: str
    seed: int = 0  # S2FT selection seed
    disjoint_from: str | None = None  # name of the adapter whose selection this one avoids


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two adapters (for task a, for task b) and how to fuse them."""

    name: str
    a: str
    b: str
    combinations: tuple[str, ...]

    @property
    def s2ft(self) -> bool:
        return self.name.startswith("s2ft")


def study_plan(task_a: str, task_b: str) -> tuple[list[AdapterSpec], list[Pair]]:
    adapters = [
        AdapterSpec(f"s2ft-{task_a}", "s2ft", task_a),
        AdapterSpec(f"s2ft-{task_b}", "s2ft", task_b),
        AdapterSpec(f"s2ft-seed1-{task_b}", "s2ft", task_b, seed=1),
        AdapterSpec(f"lora-{task_a}", "lora", task_a),
        AdapterSpec(f"lora-{task_b}", "lora", task_b),
        AdapterSpec(f"s2ft-disjoint-{task_b}", "s2ft", task_b, disjoint_from=f"s2ft-{task_a}"),
        # A second draw of each kind of selection: how much of a difference is the draw, not the overlap.
        AdapterSpec(f"s2ft-seed2-{task_b}", "s2ft", task_b, seed=2),
        AdapterSpec(f"s2ft-disjoint-seed1-{task_b}", "s2ft", task_b, seed=1, disjoint_from=f"s2ft-{task_a}"),
    ]
    pairs = [
        Pair("s2ft-same-selection", f"s2ft-{task_a}", f"s2ft-{task_b}", ("linear",)),
        Pair("s2ft-independent", f"s2ft-{task_a}", f"s2ft-seed1-{task_b}", ("linear",)),
        Pair("s2ft-disjoint", f"s2ft-{task_a}", f"s2ft-disjoint-{task_b}", ("linear",)),
        Pair("lora", f"lora-{task_a}", f"lora-{task_b}", ("cat", "linear")),
        Pair("s2ft-independent-seed2", f"s2ft-{task_a}", f"s2ft-seed2-{task_b}", ("linear",)),
        Pair("s2ft-disjoint-seed1", f"s2ft-{task_a}", f"s2ft-disjoint-seed1-{task_b}", ("linear",)),
    ]
    return adapters, pairs


def fused_setup(pair: Pair, combination: str, weights: tuple[float, float]) -> str:
    return f"fused:{pair.name}:{combination}:{weights[0]:g}/{weights[1]:g}"


def features() -> dict[str, bool]:
    """Which of the fusion features the installed peft_s2ft has (they land while this study is written)."""
    import peft_s2ft

    fields = {f.name for f in dataclasses.fields(peft_s2ft.S2FTConfig)}
    return {"disjoint_from": "disjoint_from" in fields, "selection_overlap": hasattr(peft_s2ft, "selection_overlap")}


class Study:
    """Runs what is missing from the records, in an order that needs the newest features last."""

    def __init__(self, args: argparse.Namespace, settings: dict[str, Any]) -> None:
        from peft_s2ft.train.embedded_model import resolve_model

        self.args, self.settings = args, settings
        self.source = resolve_model(args.model)
        self.records = Records(Path(args.output), settings, args.restart)
        self.work = Path(args.work_dir)
        self.task_names = settings["tasks"].split(",")
        if len(self.task_names) != 2 or self.task_names[0] == self.task_names[1]:
            raise SystemExit("--tasks takes two different task names.")
        for name in self.task_names:
            if name not in TASKS:
                raise SystemExit(f"unknown task {name!r}; choose from {', '.join(TASKS)}.")
        self.adapters, self.pairs = study_plan(*self.task_names)
        self.adapter_by_name = {a.name: a for a in self.adapters}
        self.weights = [(w, w) for w in (float(x) for x in args.weights.split(","))]
        self.skipped: list[str] = []
        self.tokenizer = self._tokenizer()
        self.splits = {name: self._splits(name) for name in self.task_names}
        answer_tokens = [
            len(self.tokenizer(c, add_special_tokens=False)["input_ids"]) + 1
            for split, _ in self.splits.values()
            for c in split.completions
        ]
        self.max_new_tokens = settings["max_new_tokens"] or max(answer_tokens) + 4

    # ---------------------------------------------------------------------------------------- loading

    def _tokenizer(self) -> Any:
        return load_tokenizer(self.source, self.settings["system_prompt"])

    def _base(self) -> Any:
        return load_base(self.source)

    def _splits(self, task: str) -> tuple[Any, Any]:
        from peft_s2ft.train.task import encode_example

        s = self.settings
        train_size = s["train_samples"] or s["max_steps"] * s["batch_size"]

        def fits(question: str, answer: str) -> bool:
            return encode_example(self.tokenizer, question, answer, s["max_length"]) is not None

        train, test = make_splits(TASKS[task], train_size, s["test_samples"], s["seed"], fits)
        key = f"data/{task}"
        if key not in self.records:
            counts: dict[str, int] = {}
            for answer in test.answers:
                counts[answer] = counts.get(answer, 0) + 1
            top = max(counts, key=counts.__getitem__)
            self.records.add(
                dict(
                    id=key,
                    kind="data",
                    task=task,
                    dataset=TASKS[task].dataset,
                    generator_config=TASKS[task].config,
                    train_examples=len(train),
                    test_examples=len(test),
                    train_test_shared_questions=len(set(train.prompts) & set(test.prompts)),
                    test_most_common_answer=top,
                    test_most_common_answer_share=counts[top] / len(test),
                    example_question=test.prompts[0],
                    example_answer=test.answers[0],
                )
            )
        return train, test

    def adapter_dir(self, name: str) -> Path:
        return self.work / "adapters" / name

    # --------------------------------------------------------------------------------------- training

    def _peft_config(self, spec: AdapterSpec) -> tuple[Any, dict[str, Any]]:
        import peft_s2ft
        from peft_s2ft.train.lora_baseline import PAPER_LORA_TARGETS, lora_config

        if spec.method == "lora":
            rank, count = self.matched_rank()
            return lora_config(rank, PAPER_LORA_TARGETS), {"rank": rank, "matched_to_s2ft_params": count}
        extra: dict[str, Any] = {"seed": spec.seed}
        if spec.disjoint_from is not None:
            extra["disjoint_from"] = [str(self.ensure_adapter(spec.disjoint_from))]
        return peft_s2ft.S2FTConfig(task_type="CAUSAL_LM", **extra), extra

    def matched_rank(self) -> tuple[int, int]:
        """LoRA's rank closest to S2FT's default trainable count, both counted on weightless copies."""
        from peft import get_peft_model
        from transformers import AutoConfig, AutoModelForCausalLM

        import peft_s2ft
        from peft_s2ft.train.lora_baseline import PAPER_LORA_TARGETS, matched_lora_rank

        config = AutoConfig.from_pretrained(self.source)
        with torch.device("meta"):
            s2ft_shell, lora_shell = (AutoModelForCausalLM.from_config(config) for _ in range(2))
        s2ft = get_peft_model(s2ft_shell, peft_s2ft.S2FTConfig(task_type="CAUSAL_LM"))
        count = sum(p.numel() for p in s2ft.parameters() if p.requires_grad)
        return matched_lora_rank(lora_shell, PAPER_LORA_TARGETS, count), count

    def needs(self, spec: AdapterSpec) -> bool:
        """Whether a run this adapter feeds is still missing (only then is a lost folder retrained)."""
        keys = [f"train/{spec.name}", *self._eval_ids(spec.name)]
        keys += [f"train/{other.name}" for other in self.adapters if other.disjoint_from == spec.name]
        for pair in self.pairs:
            if spec.name in (pair.a, pair.b):
                keys += [f"overlap/{pair.name}"] if pair.s2ft else []
                keys += [
                    k for c in pair.combinations for w in self.weights for k in self._eval_ids(fused_setup(pair, c, w))
                ]
        return any(key not in self.records for key in keys)

    def _eval_ids(self, setup: str) -> list[str]:
        return [f"eval/{setup}/{task}" for task in self.task_names]

    def ensure_adapter(self, name: str) -> Path:
        """The adapter's folder, training it first if it is not recorded or its folder is gone."""
        path = self.adapter_dir(name)
        key = f"train/{name}"
        if key in self.records and (path / "adapter_config.json").is_file():
            return path
        if key in self.records:
            print(f"{name}: recorded, but {path} is gone; retraining it")
        self.train(self.adapter_by_name[name])
        return path

    def train(self, spec: AdapterSpec) -> None:
        from peft import get_peft_model
        from transformers import set_seed

        from peft_s2ft.train.cli import train_adapter
        from peft_s2ft.train.task import encode_split

        s = self.settings
        if spec.disjoint_from is not None and not features()["disjoint_from"]:
            raise FeatureMissing("S2FTConfig(disjoint_from=...)")
        train_split, _ = self.splits[spec.task]
        rows, dropped = encode_split(self.tokenizer, train_split, s["max_length"])
        assert not dropped, "the splits only hold problems that fit"
        print(f"== train {spec.name}: {len(rows)} examples, {s['max_steps']} steps of {s['batch_size']}")
        set_seed(s["seed"])  # LoRA's initialisation draws from torch's global generator
        before = machine_state()
        peft_config, config_fields = self._peft_config(spec)
        model = get_peft_model(self._base(), peft_config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        base_params = sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad)
        lr = s["lr_s2ft"] if spec.method == "s2ft" else s["lr_lora"]
        trainer_args = argparse.Namespace(
            output_dir=str(self.work / "trainer"),
            max_steps=s["max_steps"],
            batch_size=s["batch_size"],
            method=spec.method,
            learning_rate=lr,
            seed=s["seed"],
        )
        seconds, cpu_seconds, final_loss = train_adapter(model, rows, trainer_args, self.tokenizer.pad_token_id)
        path = self.adapter_dir(spec.name)
        staging = path.with_name(path.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)
        self.records.add(
            dict(
                id=f"train/{spec.name}",
                kind="train",
                adapter=spec.name,
                method=spec.method,
                task=spec.task,
                config=config_fields,
                trainable_params=trainable,
                base_params=base_params,
                learning_rate=lr,
                max_steps=s["max_steps"],
                batch_size=s["batch_size"],
                train_examples=len(rows),
                seed=s["seed"],
                train_seconds=seconds,
                train_cpu_seconds=cpu_seconds,
                final_train_loss=final_loss,
                adapter_bytes=(path / "adapter_model.safetensors").stat().st_size,
                adapter_dir=str(path),
                machine_before=before,
                machine_after=machine_state(),
                code=code_version(),
                torch_threads=torch.get_num_threads(),
                finished=time.strftime("%Y-%m-%d %H:%M:%S"),
            )
        )
        del model
        gc.collect()

    # ------------------------------------------------------------------------------------- evaluation

    @contextlib.contextmanager
    def setup_model(self, setup: str) -> Iterator[tuple[Any, dict[str, Any]]]:
        """A fresh model for `setup` ("base", "base-long", an adapter name or a fused setup) and facts about it."""
        from peft import PeftModel

        facts: dict[str, Any] = {}
        model = self._base()
        if setup.startswith("fused:"):
            _, pair_name, combination, weights = setup.split(":")
            pair = next(p for p in self.pairs if p.name == pair_name)
            w = [float(x) for x in weights.split("/")]
            model = PeftModel.from_pretrained(model, self.ensure_adapter(pair.a), adapter_name="a")
            model.load_adapter(self.ensure_adapter(pair.b), adapter_name="b")
            started = time.perf_counter()
            model.add_weighted_adapter(["a", "b"], w, "fused", combination_type=combination)
            facts["fuse_seconds"] = time.perf_counter() - started
            model.set_adapter("fused")
            facts.update(a=pair.a, b=pair.b, combination=combination, weights=w)
            if w == [1.0, 1.0]:
                facts["fused_vs_sum_max_abs_logit_diff"] = self._fused_vs_sum(model)
            facts["fused_reload_max_abs_logit_diff"] = self._fused_reload(model, setup)
        elif setup not in ("base", "base-long"):
            model = PeftModel.from_pretrained(model, self.ensure_adapter(setup))
        try:
            yield model.eval(), facts
        finally:
            del model
            gc.collect()

    def _check_batch(self) -> dict[str, torch.Tensor]:
        from peft_s2ft.train.task import render_prompt

        prompts = [
            render_prompt(self.tokenizer, p) for _, test in self.splits.values() for p in test.prompts[:CHECK_ROWS]
        ]
        plain = not getattr(self.tokenizer, "chat_template", None)
        return self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=plain)

    @torch.no_grad()
    def _fused_reload(self, model: Any, setup: str) -> float:
        """Save the fused adapter, load it onto a fresh base model: max |logit difference| from the fused model."""
        from peft import PeftModel

        folder = self.work / "fused" / setup.replace(":", "_").replace("/", "-")
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder, selected_adapters=["fused"])
        batch = self._check_batch()
        mask = batch["attention_mask"].bool()
        expected = model(**batch).logits[mask]
        # PEFT saves an adapter other than "default" into a subfolder named after it.
        saved = folder / "fused" if (folder / "fused" / "adapter_config.json").is_file() else folder
        reloaded = PeftModel.from_pretrained(self._base(), saved).eval()
        difference = float((reloaded(**batch).logits[mask] - expected).abs().max())
        del reloaded
        return difference

    @torch.no_grad()
    def _fused_vs_sum(self, model: Any) -> float | str:
        """Max |logit difference| between the fused adapter and adapters a and b active together (the exact sum)."""
        batch = self._check_batch()
        mask = batch["attention_mask"].bool()
        fused = model(**batch).logits[mask]
        try:
            model.base_model.set_adapter(["a", "b"])
            both = model(**batch).logits[mask]
        except Exception as error:  # a report, not a failure: S2FT or LoRA may refuse two active adapters
            return f"{type(error).__name__}: {error}"
        finally:
            model.set_adapter("fused")
        return float((fused - both).abs().max())

    def evaluate(self, setup: str) -> None:
        """Evaluate `setup` on every task whose record is missing."""
        from peft_s2ft.train.task import evaluate, is_correct

        pending = [t for t in self.task_names if f"eval/{setup}/{t}" not in self.records]
        if not pending:
            return
        s = self.settings
        new_tokens = s["long_new_tokens"] if setup == "base-long" else self.max_new_tokens
        before = machine_state()
        with self.setup_model(setup) as (model, facts):
            for task in pending:
                _, test = self.splits[task]
                started, cpu_started = time.perf_counter(), time.process_time()
                result = evaluate(
                    model, self.tokenizer, test, self.args.eval_batch_size, new_tokens, s["max_length"], setup
                )
                correct = [is_correct(g, a) for g, a in zip(result.generations, test.answers, strict=True)]
                self.records.add(
                    dict(
                        id=f"eval/{setup}/{task}",
                        kind="eval",
                        setup=setup,
                        task=task,
                        correct=sum(correct),
                        total=len(correct),
                        accuracy=sum(correct) / len(correct),
                        per_problem="".join("1" if c else "0" for c in correct),
                        max_new_tokens=new_tokens,
                        generations=result.generations,  # short: the answers of a numeric task
                        eval_seconds=time.perf_counter() - started,
                        eval_cpu_seconds=time.process_time() - cpu_started,
                        machine_before=before,
                        code=code_version(),
                        **facts,
                    )
                )
                print(f"{setup} on {task}: {sum(correct)}/{len(correct)}")

    def overlap(self, pair: Pair) -> None:
        from peft import PeftModel

        import peft_s2ft

        key = f"overlap/{pair.name}"
        if key in self.records:
            return
        if not features()["selection_overlap"]:
            raise FeatureMissing("peft_s2ft.selection_overlap")
        model = PeftModel.from_pretrained(self._base(), self.ensure_adapter(pair.a), adapter_name="a")
        model.load_adapter(self.ensure_adapter(pair.b), adapter_name="b")
        overlap = peft_s2ft.selection_overlap(model, "a", "b")
        self.records.add(dict(id=key, kind="overlap", pair=pair.name, a=pair.a, b=pair.b, overlap=overlap))
        print(f"overlap {pair.name}: {json.dumps(overlap, default=jsonable)[:300]}")

    # ------------------------------------------------------------------------------------------- flow

    def attempt(self, what: str, run: Callable[[], None]) -> None:
        """Run one step; a feature the installed peft_s2ft lacks skips it (reported at the end)."""
        try:
            run()
        except FeatureMissing as missing:
            self.skipped.append(f"{what}: needs {missing}")
        except NotImplementedError as error:
            self.skipped.append(f"{what}: {str(error).splitlines()[0][:160]}")

    def run(self) -> int:
        # What needs only released features first: adapters and their evaluations, then the new features.
        for spec in self.adapters:
            if self.needs(spec):
                self.attempt(f"train {spec.name}", lambda spec=spec: self.ensure_adapter(spec.name))
        for setup in ["base", "base-long", *(a.name for a in self.adapters)]:
            if setup in self.adapter_by_name and f"train/{setup}" not in self.records:
                continue  # its training was skipped above
            self.attempt(f"eval {setup}", lambda setup=setup: self.evaluate(setup))
        for pair in self.pairs:
            if not all(f"train/{n}" in self.records for n in (pair.a, pair.b)):
                self.skipped.append(f"pair {pair.name}: an adapter is not trained")
                continue
            if pair.s2ft:
                self.attempt(f"overlap {pair.name}", lambda pair=pair: self.overlap(pair))
            for combination in pair.combinations:
                for w in self.weights:
                    setup = fused_setup(pair, combination, w)
                    self.attempt(f"eval {setup}", lambda setup=setup: self.evaluate(setup))
        if self.skipped:
            print("not done yet (re-run when the features have landed):\n  " + "\n  ".join(self.skipped))
            return EXIT_INCOMPLETE
        print(f"study complete: {len(self.records.by_id)} records in {self.records.path}")
        return 0


class FeatureMissing(RuntimeError):
    """A run needs a peft_s2ft feature that is not installed yet."""


# ------------------------------------------------------------------------------------------------- report


def _cell(record: dict[str, Any] | None) -> str:
    if record is None:
        return "–"
    return f"{100 * record['accuracy']:.1f}% ({record['correct']}/{record['total']})"


def _paired(alone: dict[str, Any] | None, other: dict[str, Any] | None) -> str:
    """Difference in points, with the problems lost and gained (a paired view of the same test set)."""
    if alone is None or other is None:
        return "–"
    lost = sum(x == "1" and y == "0" for x, y in zip(alone["per_problem"], other["per_problem"], strict=True))
    gained = sum(x == "0" and y == "1" for x, y in zip(alone["per_problem"], other["per_problem"], strict=True))
    return f"{100 * (other['accuracy'] - alone['accuracy']):+.1f} (−{lost}/+{gained})"


def standard_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def report(path: Path) -> str:
    """Markdown tables of a records file: fusion results, overlaps and training runs."""
    stored = json.loads(path.read_text())
    records = {r["id"]: r for r in stored["records"]}
    settings = stored["settings"]
    tasks = settings["tasks"].split(",")
    adapters, pairs = study_plan(*tasks)
    fused = {r["setup"] for r in records.values() if r["kind"] == "eval" and r["setup"].startswith("fused:")}
    weights = sorted({tuple(float(x) for x in f.rsplit(":", 1)[1].split("/")) for f in fused}, reverse=True)

    def ev(setup: str, task: str) -> dict[str, Any] | None:
        return records.get(f"eval/{setup}/{task}")

    def pct(record: dict[str, Any] | None) -> str:
        return "–" if record is None else f"{100 * record['accuracy']:.1f}"

    # The compact table: accuracy in % per task: the task's adapter alone, the other adapter, fused per weight.
    fused_cols = [f"fused {w[0]:g}/{w[1]:g}" for w in weights]
    head = [f"{t}: {c}" for t in tasks for c in ("alone", "other", *fused_cols)]
    lines = ["| pair, fusion | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    lines.append(
        "| base model | "
        + " | ".join(" | ".join([pct(ev("base", t))] + [""] * (1 + len(weights))) for t in tasks)
        + " |"
    )
    for pair in pairs:
        for combination in pair.combinations:
            cells = []
            for task, own, other in ((tasks[0], pair.a, pair.b), (tasks[1], pair.b, pair.a)):
                cells += [pct(ev(own, task)), pct(ev(other, task))]
                cells += [pct(ev(fused_setup(pair, combination, w), task)) for w in weights]
            lines.append(f"| {pair.name}, {combination} | " + " | ".join(cells) + " |")

    # Paired differences between the 1/1 fusions, on the same test problems.
    ones = [fused_setup(p, c, (1.0, 1.0)) for p in pairs for c in p.combinations]
    for task in tasks:
        present = [f for f in ones if ev(f, task) is not None]
        lines += ["", f"{task}: row − column, points (problems the row loses/gains against the column), fused 1/1", ""]
        lines += ["| | " + " | ".join(f.split(":")[1] + " " + f.split(":")[2] for f in present) + " |"]
        lines += ["|---|" + "---|" * len(present)]
        for row in present:
            cells = ["" if row == col else _paired(ev(col, task), ev(row, task)) for col in present]
            lines.append(f"| {row.split(':')[1]} {row.split(':')[2]} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "| pair, fusion | task | base | adapter for this task alone | the other task's adapter | fused "
        "| fused − alone, points (lost/gained) |",
        "|---|---|---|---|---|---|---|",
    ]
    for pair in pairs:
        for combination in pair.combinations:
            for w in weights:
                setup = fused_setup(pair, combination, w)
                for task, own, other in ((tasks[0], pair.a, pair.b), (tasks[1], pair.b, pair.a)):
                    lines.append(
                        f"| {pair.name}, {combination} {w[0]:g}/{w[1]:g} | {task} | {_cell(ev('base', task))} "
                        f"| {_cell(ev(own, task))} | {_cell(ev(other, task))} | {_cell(ev(setup, task))} "
                        f"| {_paired(ev(own, task), ev(setup, task))} |"
                    )
    lines += ["", "| base model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for setup in ("base", "base-long"):
        tokens = next((r["max_new_tokens"] for r in records.values() if r.get("setup") == setup), "?")
        lines.append(f"| {setup} ({tokens} new tokens) | " + " | ".join(_cell(ev(setup, t)) for t in tasks) + " |")
    lines += ["", "| adapter | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for spec in adapters:
        lines.append(f"| {spec.name} | " + " | ".join(_cell(ev(spec.name, t)) for t in tasks) + " |")

    lines += [
        "",
        "| fused setup | max abs logit diff, fused vs. a and b both active | after save + reload | fuse time (s) |",
        "|---|---|---|---|",
    ]
    for pair in pairs:
        for combination in pair.combinations:
            for w in weights:
                r = ev(fused_setup(pair, combination, w), tasks[0])
                if r is not None:
                    diff = r.get("fused_vs_sum_max_abs_logit_diff", "–")
                    diff = f"{diff:.2e}" if isinstance(diff, float) else diff
                    reload = r.get("fused_reload_max_abs_logit_diff")
                    reload = "–" if reload is None else f"{reload:.2e}"
                    lines.append(
                        f"| {fused_setup(pair, combination, w)} | {diff} | {reload} | {r['fuse_seconds']:.2f} |"
                    )

    lines += ["", "| S2FT pair | overlap (selection_overlap) |", "|---|---|"]
    for pair in pairs:
        r = records.get(f"overlap/{pair.name}")
        if r is not None:
            lines.append(f"| {pair.name} | `{json.dumps(_summary(r['overlap']))}` |")

    lines += [
        "",
        "| adapter | trainable params | LoRA rank | lr | train wall s | train CPU s | final loss "
        "| load avg before/after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec in adapters:
        r = records.get(f"train/{spec.name}")
        if r is None:
            continue
        load = f"{r['machine_before']['loadavg'][0]:.1f} / {r['machine_after']['loadavg'][0]:.1f}"
        loss = "–" if r["final_train_loss"] is None else f"{r['final_train_loss']:.3f}"
        lines.append(
            f"| {spec.name} | {r['trainable_params']:,} | {r['config'].get('rank', '–')} | {r['learning_rate']:g} "
            f"| {r['train_seconds']:.0f} | {r['train_cpu_seconds']:.0f} | {loss} | {load} |"
        )
    n = min((r["total"] for r in records.values() if r["kind"] == "eval"), default=0)
    if n:
        lines += [
            "",
            f"Binomial standard error with n = {n}: "
            + ", ".join(f"{100 * standard_error(p, n):.1f} points at {100 * p:.0f}%" for p in (0.1, 0.3, 0.5)),
        ]
    lines += ["", "| setup | task | most frequent predicted answers (count) | no number |", "|---|---|---|---|"]
    for r in records.values():
        if r["kind"] == "eval" and "generations" in r:
            top, missing = _top_predictions(r["generations"])
            lines.append(f"| {r['setup']} | {r['task']} | {top} | {missing} |")
    return "\n".join(lines)


def _top_predictions(generations: list[str], k: int = 4) -> tuple[str, int]:
    """The k most frequent extracted answers, and how many generations hold no number."""
    from peft_s2ft.train.task import extract_answer

    counts: dict[str, int] = {}
    missing = 0
    for text in generations:
        answer = extract_answer(text)
        if answer is None:
            missing += 1
        else:
            counts[answer] = counts.get(answer, 0) + 1
    top = sorted(counts.items(), key=lambda item: -item[1])[:k]
    return ", ".join(f"{a} ({c})" for a, c in top), missing


def _summary(overlap: Any) -> Any:
    """The scalar entries of selection_overlap's answer (per-layer detail is left in the records)."""
    if isinstance(overlap, dict):
        return {k: v for k, v in overlap.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return overlap


# -------------------------------------------------------------------------------------------------- probe


def probe(args: argparse.Namespace, tasks: list[str]) -> int:
    """Which tasks the model learns in a short run: base accuracy, then S2FT for --probe-steps, per task.

    One record per task in --output (default docs/results/fusion-probe.json), finished tasks skipped on re-run.
    """
    from peft import get_peft_model
    from transformers import set_seed

    import peft_s2ft
    from peft_s2ft.train.cli import train_adapter
    from peft_s2ft.train.embedded_model import resolve_model
    from peft_s2ft.train.task import encode_example, encode_split, evaluate

    source = resolve_model(args.model)
    settings = dict(
        model=args.model or "smollm2-135m",
        steps=args.probe_steps,
        batch_size=args.batch_size,
        test_samples=args.probe_test_samples,
        max_length=args.max_length,
        lr=args.lr_s2ft,
        seed=args.seed,
        system_prompt=args.system_prompt,
    )
    records = Records(Path(args.output), settings, args.restart)
    tokenizer = load_tokenizer(source, args.system_prompt)
    for task in tasks:
        if f"probe/{task}" in records:
            continue
        if task not in TASKS:
            raise SystemExit(f"unknown task {task!r}; choose from {', '.join(TASKS)}.")

        def fits(question: str, answer: str) -> bool:
            return encode_example(tokenizer, question, answer, args.max_length) is not None

        train, test = make_splits(
            TASKS[task], args.probe_steps * args.batch_size, args.probe_test_samples, args.seed, fits
        )
        rows, _ = encode_split(tokenizer, train, args.max_length)
        new_tokens = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in train.completions) + 4
        model = load_base(source)
        base = evaluate(model, tokenizer, test, args.eval_batch_size, new_tokens, args.max_length, f"base {task}")
        set_seed(args.seed)
        model = get_peft_model(model, peft_s2ft.S2FTConfig(task_type="CAUSAL_LM"))
        trainer_args = argparse.Namespace(
            output_dir=str(Path(args.work_dir) / "trainer"),
            max_steps=args.probe_steps,
            batch_size=args.batch_size,
            method="s2ft",
            learning_rate=args.lr_s2ft,
            seed=args.seed,
        )
        before = machine_state()
        seconds, cpu_seconds, loss = train_adapter(model, rows, trainer_args, tokenizer.pad_token_id)
        tuned = evaluate(model, tokenizer, test, args.eval_batch_size, new_tokens, args.max_length, f"s2ft {task}")
        records.add(
            dict(
                id=f"probe/{task}",
                kind="probe",
                task=task,
                dataset=TASKS[task].dataset,
                generator_config=TASKS[task].config,
                train_examples=len(rows),
                test_examples=len(test),
                max_new_tokens=new_tokens,
                base_correct=base.correct,
                s2ft_correct=tuned.correct,
                base_samples=base.generations[:4],
                s2ft_samples=tuned.generations[:4],
                train_seconds=seconds,
                train_cpu_seconds=cpu_seconds,
                final_train_loss=loss,
                machine_before=before,
                machine_after=machine_state(),
                code=code_version(),
            )
        )
        print(f"probe {task}: base {base.correct}/{len(test)} -> s2ft {tuned.correct}/{len(test)} ({seconds:.0f} s)")
        del model
        gc.collect()
    return 0


# ---------------------------------------------------------------------------------------------------- cli


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The command line, and the settings that decide the results (what a records file is resumed under)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny budget: the whole pipeline in minutes")
    parser.add_argument("--model", help="a local model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--output", help="records file (default: docs/results/fusion.json; --quick: outputs/)")
    parser.add_argument("--work-dir", help="adapters and trainer scratch (default: outputs/fusion[-quick])")
    parser.add_argument("--restart", action="store_true", help="discard the records of --output first")
    parser.add_argument("--report", action="store_true", help="print the markdown tables of --output and exit")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machines are shared)")
    parser.add_argument(
        "--probe", metavar="TASKS", help="comma list of tasks to probe (see probe()) instead of the study"
    )
    parser.add_argument("--probe-steps", type=int, default=32, help="S2FT steps per probed task")
    parser.add_argument("--probe-test-samples", type=int, default=100, help="test problems per probed task")
    add_setting_options(parser, FULL, QUICK)
    args = parser.parse_args(argv)
    records = "docs/results/fusion-probe.json" if args.probe else "docs/results/fusion.json"
    settings = fill_settings(args, FULL, QUICK, "fusion", records, RESULT_KEYS)
    return args, settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    code_version()
    if args.report:
        print(report(Path(args.output)))
        return 0
    torch.set_num_threads(args.threads)
    if args.probe:
        return probe(args, args.probe.split(","))
    started = time.perf_counter()
    status = Study(args, settings).run()
    print(f"python {platform.python_version()}, torch {torch.__version__}; {time.perf_counter() - started:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
