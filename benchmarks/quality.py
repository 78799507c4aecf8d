"""Does S2FT learn better and forget less? Eight fine-tuning methods on the same data, budget and seeds.

Every method trains the same causal LM on the same training split with the same steps, batch, schedule (AdamW,
linear decay, 10% warm-up) and seeds, at a trainable-parameter count matched to S2FT's default (full fine-tuning
aside). Each method's learning rate is the one of a shared grid with the lowest loss on a validation split drawn
from the training distribution (never the test split), chosen on seed 0; seeds 1, 2, ... then train at that rate.
Where a grid edge wins, that method's grid goes on one step (1e-2 -> 3e-2 -> 1e-1, 1e-4 -> 3e-5 -> 1e-5) until its
best rate is interior, at most `--grid-edge-steps` steps per side, so that no method is judged at a rate the grid
merely cut off.
Seed s is the data order, the selection draw (S2FT, PaCA) and the initialisation, the same for every method, so
differences between methods can be paired by seed.

Methods: `s2ft` (S2FTConfig's defaults), `s2ft-activation` (the paper's best data-driven selection,
`activation_small`, calibrated on 1% of the training rows), `lora` (q, k, v, up, down: the paper's baseline),
`lora-all` (every linear map of the layers), `full`, `paca` (peft_s2ft.PaCAConfig), `pissa` (PEFT's
`init_lora_weights="pissa"`, alpha = r) and `sorsa` (benchmarks/sorsa.py: PiSSA's split with trainable singular
values and the orthonormal regulariser as a loss term).

Measured per (method, seed): accuracy on the held-out test split (exact match of the final number of a greedy
generation), accuracy on transfer tasks the model was not trained on, forgetting (on the model's own greedy
continuations of varied prompts that are in no training data, benchmarks/data/forgetting_prompts.txt: the mean
per-token KL divergence from the base model and the NLL of those continuations) and cost (training wall and CPU
time, peak memory, trainable parameters, adapter size).

Resumable: each finished run is one record in `--output`, written when it ends; a re-run does what is missing
(a training run whose evaluation is missing is retrained if its snapshot is gone).

    python benchmarks/quality.py                      # the study on the embedded SmolLM2-135M-Instruct
    python benchmarks/quality.py --report --plot docs/quality.png   # the tables of docs/quality.md
    python benchmarks/quality.py --quick              # every method through the whole pipeline, in minutes
    python benchmarks/quality.py --model meta-llama/Llama-3.1-8B --data my.jsonl --methods s2ft,lora
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Run as a script, the repository root is not on the path; as a module it already is.
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.study_records import Records, add_setting_options, code_version, fill_settings, machine_state  # noqa: E402

# In the order the study runs them: the comparison the study exists for first, as each method completes in turn.
METHODS = ("s2ft", "lora", "s2ft-activation", "paca", "full", "sorsa", "pissa", "lora-all")
# Methods whose LoRA rank (or PaCA column count) is matched to S2FT's trainable parameters, and on what targets
# (benchmarks/methods.py's names: "lora" = the paper's q, k, v, up, down).
MATCHED_ON = {"lora": "lora", "lora-all": "lora-all", "pissa": "lora", "sorsa": "lora", "paca": "paca"}
FORGETTING_PROMPTS = Path(__file__).resolve().parent / "data" / "forgetting_prompts.txt"
EXIT_INCOMPLETE = 3

# Settings that decide the results; a records file made with other values is not resumed.
FULL = dict(
    data="gsm_symbolic",  # reasoning-gym's gsm_symbolic, another reasoning-gym task of fusion.TASKS, or FILE.jsonl
    transfer="basic_arithmetic,leg_counting",
    methods=",".join(METHODS),
    seeds="0,1,2",
    learning_rates="1e-4,3e-4,1e-3,3e-3,1e-2",
    grid_edge_steps=2,  # per method and side: how far past a winning grid edge the search may go
    max_steps=64,
    batch_size=8,
    max_length=192,
    max_number=100.0,  # gsm_symbolic only: as `peft-s2ft train`, problems whose solution uses numbers up to this
    val_samples=64,
    test_samples=200,
    transfer_samples=80,
    forgetting_prompts=40,
    forgetting_tokens=48,
    max_new_tokens=None,  # longest training completion + 16 tokens
    sorsa_gamma=1e-3,
    system_prompt="none",  # "default": the chat template's own default system turn
)
QUICK = dict(
    FULL,
    data="chain_sum",
    transfer="gcd",
    seeds="0,1",
    learning_rates="1e-3,3e-3",
    grid_edge_steps=0,
    max_steps=2,
    batch_size=2,
    max_length=512,
    val_samples=4,
    test_samples=3,
    transfer_samples=2,
    forgetting_prompts=3,
    forgetting_tokens=4,
    max_new_tokens=6,
)
RESULT_KEYS = tuple(FULL)


# --------------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class Data:
    train: Any  # peft_s2ft.train.task.Split
    val: Any
    test: Any
    transfer: dict[str, Any]
    prompts: list[str]  # forgetting prompts


def _gsm_splits(settings: dict[str, Any], tokenizer: Any, train_size: int) -> tuple[Any, Any]:
    from peft_s2ft.train.task import encode_example, gsm_symbolic, largest_number

    def fits(question: str, solution: str) -> bool:
        if settings["max_number"] and largest_number(solution) > settings["max_number"]:
            return False
        return encode_example(tokenizer, question, solution, settings["max_length"]) is not None

    return gsm_symbolic(train_size, settings["test_samples"], seed=0, keep=fits)


def load_data(settings: dict[str, Any], tokenizer: Any) -> Data:
    """The splits; validation rows are the last rows drawn for training, so none is a test row."""
    from benchmarks.fusion import TASKS, make_splits
    from peft_s2ft.train.task import encode_example, jsonl_splits

    s = settings
    train_size = s["max_steps"] * s["batch_size"]
    size = train_size + s["val_samples"]

    def fits(question: str, answer: str) -> bool:
        return encode_example(tokenizer, question, answer, s["max_length"]) is not None

    if s["data"] == "gsm_symbolic":
        train, test = _gsm_splits(s, tokenizer, size)
    elif s["data"] in TASKS:
        train, test = make_splits(TASKS[s["data"]], size, s["test_samples"], 0, fits)
    elif s["data"].endswith(".jsonl"):
        train, test = jsonl_splits(s["data"], size, s["test_samples"], 0, None)
    else:
        raise SystemExit(f"--data {s['data']!r}: use gsm_symbolic, one of {', '.join(TASKS)}, or a FILE.jsonl.")
    if len(train) < size:
        raise SystemExit(f"--data {s['data']}: {len(train)} training rows, the study needs {size}.")
    val = type(train)(train.prompts[train_size:], train.completions[train_size:], train.answers[train_size:])
    transfer = {}
    for name in filter(None, s["transfer"].split(",")):
        if name not in TASKS or name == s["data"]:
            raise SystemExit(f"--transfer {name!r}: choose tasks of {', '.join(TASKS)} other than --data.")
        transfer[name] = make_splits(TASKS[name], 0, s["transfer_samples"], 0, fits)[1]
    prompts = [p for p in FORGETTING_PROMPTS.read_text().splitlines() if p.strip()][: s["forgetting_prompts"]]
    return Data(train.head(train_size), val, test, transfer, prompts)


def eval_id(method: str, lr: float | None, seed: int) -> str:
    return f"eval/{method}/lr{lr:g}/seed{seed}"


def ladder_step(lr: float, up: bool) -> float:
    """The next rate of the 1-3 ladder (1e-3, 3e-3, 1e-2, ...) above or below `lr`; off the ladder, x or / 3."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10**exponent
    if math.isclose(mantissa, 1.0, rel_tol=1e-6):
        value = 3 * 10.0**exponent if up else 3 * 10.0 ** (exponent - 1)
    elif math.isclose(mantissa, 3.0, rel_tol=1e-6):
        value = 10.0 ** (exponent + 1) if up else 10.0**exponent
    else:
        value = lr * 3 if up else lr / 3
    return float(f"{value:.6g}")


def search_grid(base: list[float], val_losses: dict[float, float | None], edge_steps: int) -> list[float]:
    """The rates to train for one method: `base`, extended a ladder step past an edge that has the lowest
    validation loss so far, until the best rate is interior or `edge_steps` steps were taken on that side.
    `val_losses` holds the finished runs (None: diverged); the grid is final once every rate in it has one."""
    rates, steps_up, steps_down = sorted(base), 0, 0
    while all(lr in val_losses for lr in rates):
        finite = {lr: val_losses[lr] for lr in rates if val_losses[lr] is not None}
        if not finite:
            return rates
        best = min(finite, key=finite.__getitem__)
        if best == rates[-1] and steps_up < edge_steps:
            rates.append(ladder_step(best, up=True))
            steps_up += 1
        elif best == rates[0] and steps_down < edge_steps:
            rates.insert(0, ladder_step(best, up=False))
            steps_down += 1
        else:
            return rates
    return rates


# Settings that only widen the learning-rate search: a records file made with smaller values stays valid.
SEARCH_KEYS = ("learning_rates", "grid_edge_steps")


def widen_grid(path: Path, settings: dict[str, Any]) -> None:
    """Let a records file made with a narrower search (a subset of `settings`' learning rates, fewer edge steps;
    otherwise the same settings) be resumed: its runs stay valid, each method's choice is remade."""
    import json

    if not path.is_file():
        return
    stored = json.loads(path.read_text())
    old = stored.get("settings", {})
    if old == settings or {k: v for k, v in old.items() if k not in SEARCH_KEYS} != {
        k: v for k, v in settings.items() if k not in SEARCH_KEYS
    }:
        return
    old_rates = {float(r) for r in old["learning_rates"].split(",")}
    rates = {float(r) for r in settings["learning_rates"].split(",")}
    if not old_rates <= rates or old.get("grid_edge_steps", 0) > settings["grid_edge_steps"]:
        return
    stored["settings"] = settings
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(stored, indent=1) + "\n")
    os.replace(tmp, path)
    print(
        f"{path}: learning-rate search widened ({settings['learning_rates']}, "
        f"{settings['grid_edge_steps']} edge steps); choices are remade"
    )


# ------------------------------------------------------------------------------------------------ methods


def matched_sizes(source: str, methods: list[str]) -> dict[str, Any]:
    """S2FT's default trainable count and, per matched method, the rank (or PaCA's r) closest to it."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from benchmarks.methods import matched_lora_rank
    from peft_s2ft import S2FTConfig

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):  # weightless shells: only the counts matter
        shell, s2ft_shell = (AutoModelForCausalLM.from_config(config) for _ in range(2))
    s2ft = get_peft_model(s2ft_shell, S2FTConfig(task_type="CAUSAL_LM"))
    budget = sum(p.numel() for p in s2ft.parameters() if p.requires_grad)
    for p in shell.parameters():
        p.requires_grad_(False)
    sizes: dict[str, Any] = {"s2ft_params": budget}
    for target in sorted({MATCHED_ON[m] for m in methods if m in MATCHED_ON}):
        sizes[target] = matched_lora_rank(shell, target, budget)
    return sizes


def build(method: str, base: Any, seed: int, sizes: dict[str, int], calibration: Callable[[Any, Any], None]) -> Any:
    """`base` (frozen, float32) turned into `method`'s trainee for seed `seed`."""
    from peft import LoraConfig, get_peft_model

    from benchmarks import sorsa
    from benchmarks.methods import lora_targets, method_lora_config, paca_config
    from peft_s2ft import S2FTConfig

    torch.manual_seed(seed)  # LoRA's initialisation draws from torch's global generator
    if method == "full":
        for p in base.parameters():
            p.requires_grad_(True)
        return base
    for p in base.parameters():
        p.requires_grad_(False)
    if method == "s2ft":
        return get_peft_model(base, S2FTConfig(task_type="CAUSAL_LM", seed=seed))
    if method == "s2ft-activation":
        config = S2FTConfig(task_type="CAUSAL_LM", seed=seed, selection="activation_small")
        calibration(base, config)
        return get_peft_model(base, config)
    if method == "paca":
        return get_peft_model(base, dataclasses.replace(paca_config(sizes["paca"]), seed=seed))
    rank = sizes[MATCHED_ON[method]]
    config = method_lora_config(rank, lora_targets(base, MATCHED_ON[method]))
    if method in ("pissa", "sorsa"):
        # PiSSA's convention: alpha = r, so that lora_B @ lora_A is the principal part itself.
        config = dataclasses.replace(config, lora_alpha=rank, init_lora_weights="pissa")
        assert isinstance(config, LoraConfig)
    model = get_peft_model(base, config)
    if method == "sorsa":
        sorsa.to_sorsa(model)
    return model


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Load a snapshot of trainable tensors into a freshly built trainee of the same method and seed."""
    params = dict(model.named_parameters())
    missing = set(state) ^ {n for n, p in params.items() if p.requires_grad}
    if missing:
        raise RuntimeError(f"snapshot and model disagree on the trainable tensors: {sorted(missing)[:4]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def adapter_bytes(method: str, model: Any) -> int:
    """Bytes of what a user would share: the PEFT adapter file, or every weight for full fine-tuning.

    PiSSA and SORSA adapters are counted as saved (their factors; SORSA's singular values are saved with lora_B);
    sharing them against the original base needs PEFT's conversion, which doubles the rank.
    """
    if method == "full":
        return sum(p.numel() * p.element_size() for p in model.parameters())
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors"))


class PeakMemory:
    """Peak memory during a block: CUDA's allocator peak, or on CPUs the process's resident set, sampled."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start = self.peak = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if torch.cuda.is_available() else "cpu_rss_sampled"


# -------------------------------------------------------------------------------------------------- study


def _mean_kl_and_nll(tuned: Any, reference: Any, rows: list[dict[str, list[int]]]) -> tuple[float, float]:
    """Mean over continuation tokens of KL(reference || tuned) and of the tuned model's NLL of those tokens."""
    from peft_s2ft.train.task import IGNORE_INDEX, CompletionCollator

    collate = CompletionCollator(0)
    kl_sum, nll_sum, count = 0.0, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 8):
            batch = collate(rows[start : start + 8])
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            mask = batch["labels"][:, 1:] != IGNORE_INDEX
            tuned_logp = torch.log_softmax(tuned(**inputs).logits[:, :-1][mask].float(), -1)
            ref_logp = torch.log_softmax(reference(**inputs).logits[:, :-1][mask].float(), -1)
            kl_sum += float((ref_logp.exp() * (ref_logp - tuned_logp)).sum())
            nll_sum += float(-tuned_logp.gather(-1, batch["labels"][:, 1:][mask][:, None]).sum())
            count += int(mask.sum())
    return kl_sum / count, nll_sum / count


class Study:
    def __init__(self, args: argparse.Namespace, settings: dict[str, Any]) -> None:
        from benchmarks.fusion import load_tokenizer
        from peft_s2ft.train.embedded_model import resolve_model
        from peft_s2ft.train.task import completion_token_lengths

        self.args, self.settings = args, settings
        self.source = resolve_model(args.model)
        if not args.restart:
            widen_grid(Path(args.output), settings)
        self.records = Records(Path(args.output), settings, args.restart)
        self.work = Path(args.work_dir)
        self.methods = [m for m in settings["methods"].split(",") if m]
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(METHODS)}.")
        self.seeds = [int(s) for s in settings["seeds"].split(",")]
        self.rates = [float(r) for r in settings["learning_rates"].split(",")]
        self.tokenizer = load_tokenizer(self.source, settings["system_prompt"])
        self.data = load_data(settings, self.tokenizer)
        lengths = completion_token_lengths(self.tokenizer, self.data.train.completions)
        self.max_new_tokens = settings["max_new_tokens"] or max(lengths) + 16
        self.sizes = matched_sizes(self.source, self.methods)
        self._reference: Any = None
        self._record_data()

    def _record_data(self) -> None:
        if "data" in self.records:
            return
        d = self.data
        self.records.add(
            dict(
                id="data",
                kind="data",
                train=len(d.train),
                val=len(d.val),
                test=len(d.test),
                transfer={k: len(v) for k, v in d.transfer.items()},
                forgetting_prompts=len(d.prompts),
                shared_train_test=len(set(d.train.prompts) & set(d.test.prompts)),
                shared_val_test=len(set(d.val.prompts) & set(d.test.prompts)),
                shared_train_val=len(set(d.train.prompts) & set(d.val.prompts)),
                max_new_tokens=self.max_new_tokens,
                matched_sizes=self.sizes,
                example=dict(prompt=d.test.prompts[0], completion=d.test.completions[0]),
            )
        )

    # ------------------------------------------------------------------------------------------ models

    def base(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.source, dtype=torch.float32)

    def reference(self) -> Any:
        """The untouched base model, kept for the forgetting measurement."""
        if self._reference is None:
            self._reference = self.base().eval()
        return self._reference

    def _calibrate(self, model: Any, config: Any) -> None:
        from peft_s2ft.train.cli import calibrate_on_training_rows

        rows = self._rows()
        args = argparse.Namespace(calibration_samples=None, batch_size=self.settings["batch_size"])
        calibrate_on_training_rows(model, config, rows, args, self.tokenizer.pad_token_id)

    def _rows(self) -> list[dict[str, list[int]]]:
        from peft_s2ft.train.task import encode_split

        rows, dropped = encode_split(self.tokenizer, self.data.train, self.settings["max_length"])
        if dropped:
            raise SystemExit(f"{dropped} training rows exceed --max-length {self.settings['max_length']}.")
        return rows

    @staticmethod
    def snapshot_path_for(work: Path, key: str) -> Path:
        """Where the trainable tensors of training run `key` are kept until its evaluation needs them."""
        return work / "snapshots" / (key.replace("/", "_") + ".safetensors")

    def snapshot_path(self, key: str) -> Path:
        return self.snapshot_path_for(self.work, key)

    def trainee(self, method: str, seed: int) -> Any:
        return build(method, self.base(), seed, self.sizes, self._calibrate)

    # ---------------------------------------------------------------------------------------- training

    def train(self, method: str, lr: float, seed: int) -> Any:
        """Train (method, lr, seed), record it with its validation loss, keep a snapshot; returns the model."""
        from safetensors.torch import save_file
        from transformers import set_seed

        from benchmarks import sorsa
        from peft_s2ft.train.cli import train_adapter
        from peft_s2ft.train.task import completion_loss

        s, key = self.settings, f"train/{method}/lr{lr:g}/seed{seed}"
        print(f"== {key}")
        set_seed(seed)
        before = machine_state()
        model = self.trainee(method, seed)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        trainer_args = argparse.Namespace(
            output_dir=str(self.work / "trainer"),
            max_steps=s["max_steps"],
            batch_size=s["batch_size"],
            method=method,
            learning_rate=lr,
            seed=seed,
        )
        trainer_class = sorsa.sorsa_trainer(s["sorsa_gamma"]) if method == "sorsa" else None
        with PeakMemory() as memory:
            seconds, cpu_seconds, final_loss = train_adapter(
                model, self._rows(), trainer_args, self.tokenizer.pad_token_id, trainer_class
            )
        val_loss = completion_loss(model, self.tokenizer, self.data.val, 16, s["max_length"], f"val {key}")
        path = self.snapshot_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(trainable_state(model), str(path))
        self.records.add(
            dict(
                id=key,
                kind="train",
                method=method,
                learning_rate=lr,
                seed=seed,
                val_loss=val_loss if math.isfinite(val_loss) else None,
                final_train_loss=final_loss,
                trainable_params=trainable,
                adapter_bytes=adapter_bytes(method, model),
                train_seconds=seconds,
                train_cpu_seconds=cpu_seconds,
                peak_memory_bytes=memory.peak,
                memory_before_bytes=memory.start,
                memory_kind=memory.kind,
                matched_sizes={
                    k: v for k, v in self.sizes.items() if k == "s2ft_params" or MATCHED_ON.get(method) == k
                },
                machine_before=before,
                machine_after=machine_state(),
                code=code_version(),
                torch_threads=torch.get_num_threads(),
                finished=time.strftime("%Y-%m-%d %H:%M:%S"),
            )
        )
        return model

    def grid(self, method: str) -> tuple[list[float], dict[float, float | None]]:
        """The method's search grid so far and the validation losses of its finished seed-0 runs on it."""
        recorded = {
            r["learning_rate"]: r["val_loss"]
            for r in self.records.by_id.values()
            if r["kind"] == "train" and r["method"] == method and r["seed"] == self.seeds[0]
        }
        rates = search_grid(self.rates, recorded, self.settings["grid_edge_steps"])
        return rates, {lr: recorded[lr] for lr in rates if lr in recorded}

    def _choice(self, method: str) -> tuple[float | None, list[float], dict[float, float]]:
        """(best rate or None until the grid is final, the grid, its finite validation losses)."""
        rates, losses = self.grid(method)
        finite = {lr: loss for lr, loss in losses.items() if loss is not None}
        if len(losses) < len(rates):
            return None, rates, finite
        if not finite:
            raise SystemExit(f"{method}: every learning rate of the grid diverged; widen --learning-rates.")
        return min(finite, key=finite.__getitem__), rates, finite

    def chosen_rate_or_none(self, method: str) -> float | None:
        """The grid's rate with the lowest validation loss on the first seed (None until the grid is final)."""
        return self._choice(method)[0]

    def chosen_rate(self, method: str) -> float | None:
        """chosen_rate_or_none, recorded (with the grid it was chosen from) once the grid is final."""
        best, rates, finite = self._choice(method)
        if best is None:
            return None
        stored = self.records.by_id.get(f"choice/{method}")
        if stored is None or (stored["learning_rate"], stored["grid"]) != (best, rates):
            record = dict(
                id=f"choice/{method}", kind="choice", method=method, learning_rate=best, val_losses=finite, grid=rates
            )
            self.records.add(record)
            print(f"{method}: learning rate {best:g} (validation losses {finite})")
        return best

    # -------------------------------------------------------------------------------------- evaluation

    def forgetting_rows(self) -> list[dict[str, list[int]]]:
        """The base model's greedy continuations of the forgetting prompts, as rows labelled on them (recorded)."""
        from peft_s2ft.train.task import Split, encode_split, generate

        key = "reference/forgetting"
        if key not in self.records:
            continuations = generate(
                self.reference(), self.tokenizer, self.data.prompts, 20, self.settings["forgetting_tokens"], key
            )
            self.records.add(dict(id=key, kind="reference", prompts=self.data.prompts, continuations=continuations))
        continuations = self.records[key]["continuations"]
        split = Split(self.data.prompts, continuations, [None] * len(continuations))
        rows, _ = encode_split(self.tokenizer, split, 10**6)
        return rows

    def evaluate(self, setup: str, model: Any, extra: dict[str, Any]) -> None:
        from peft_s2ft.train.task import evaluate

        key = f"eval/{setup}"
        if key in self.records:
            return
        s, before = self.settings, machine_state()
        model.eval()
        started, cpu_started = time.perf_counter(), time.process_time()
        results: dict[str, Any] = {}
        for task, split in [(s["data"], self.data.test), *self.data.transfer.items()]:
            out = evaluate(
                model, self.tokenizer, split, self.args.eval_batch_size, self.max_new_tokens, s["max_length"], task
            )
            results[task] = dict(
                correct=out.correct,
                total=out.total,
                accuracy=out.accuracy,
                loss=out.loss,
                per_problem="".join("1" if c else "0" for c in self._correct(out, split)),
            )
            print(f"{setup} on {task}: {out.correct}/{out.total}" if out.correct is not None else f"loss {out.loss}")
        kl, nll = _mean_kl_and_nll(model, self.reference(), self.forgetting_rows())
        self.records.add(
            dict(
                id=key,
                kind="eval",
                setup=setup,
                in_domain=results[s["data"]],
                transfer={t: results[t] for t in self.data.transfer},
                forgetting_kl=kl,
                forgetting_nll=nll,
                eval_seconds=time.perf_counter() - started,
                eval_cpu_seconds=time.process_time() - cpu_started,
                max_new_tokens=self.max_new_tokens,
                machine_before=before,
                code=code_version(),
                **extra,
            )
        )

    @staticmethod
    def _correct(out: Any, split: Any) -> list[bool]:
        from peft_s2ft.train.task import is_correct

        if out.correct is None:
            return []
        return [is_correct(g, a) for g, a in zip(out.generations, split.answers, strict=True)]

    # -------------------------------------------------------------------------------------------- flow

    def ensure_trained(self, method: str, lr: float, seed: int) -> Any | None:
        """The trained model if it had to be (re)trained or restored for a pending evaluation, else None."""
        from safetensors.torch import load_file

        key = f"train/{method}/lr{lr:g}/seed{seed}"
        needs_model = lr == self.chosen_rate_or_none(method) and eval_id(method, lr, seed) not in self.records
        if key not in self.records:
            return self.train(method, lr, seed)
        if not needs_model:
            return None
        path = self.snapshot_path(key)
        if not path.is_file():
            print(f"{key}: recorded, but its snapshot is gone; retraining it")
            return self.train(method, lr, seed)
        model = self.trainee(method, seed)
        restore(model, load_file(str(path)))
        return model

    def run_method(self, method: str) -> bool:
        """Grid (grown past a winning edge), choice, then every seed at the chosen rate; returns whether the
        method is complete."""
        while True:
            rates, losses = self.grid(method)
            missing = [lr for lr in rates if lr not in losses]
            if not missing:
                break
            for lr in missing:
                self._release(self.ensure_trained(method, lr, self.seeds[0]))
        best = self.chosen_rate(method)
        if best is None:
            return False
        for lr in rates:  # the grid's other snapshots are not needed any more (a full model's is large)
            if lr != best:
                self.snapshot_path(f"train/{method}/lr{lr:g}/seed{self.seeds[0]}").unlink(missing_ok=True)
        for seed in self.seeds:
            model = self.ensure_trained(method, best, seed)
            if model is not None:
                setup = eval_id(method, best, seed).removeprefix("eval/")
                self.evaluate(setup, model, dict(method=method, seed=seed, learning_rate=best))
            self._release(model)
        return all(eval_id(method, best, seed) in self.records for seed in self.seeds)

    @staticmethod
    def _release(model: Any) -> None:
        del model
        gc.collect()

    def run(self) -> int:
        self.forgetting_rows()
        if "eval/base" not in self.records:
            base = self.base()
            self.evaluate("base", base, dict(method="base"))
            self._release(base)
        complete = [self.run_method(method) for method in self.methods]
        if not all(complete):
            return EXIT_INCOMPLETE
        print(f"study complete: {len(self.records.by_id)} records in {self.records.path}")
        return 0


# ------------------------------------------------------------------------------------------------- report


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(path: Path) -> dict[str, Any]:
    """Per method: the seeds' results and their mean and standard deviation, paired differences against LoRA."""
    import json

    stored = json.loads(path.read_text())
    by_id = {r["id"]: r for r in stored["records"]}
    settings = stored["settings"]
    seeds = [int(s) for s in settings["seeds"].split(",")]
    methods = [m for m in settings["methods"].split(",") if m]
    summary: dict[str, Any] = {"settings": settings, "base": by_id.get("eval/base"), "methods": {}}
    for method in methods:
        choice = by_id.get(f"choice/{method}")
        if choice is None:  # its grid is not done yet
            continue
        lr = choice["learning_rate"]
        evals = [by_id.get(eval_id(method, lr, s)) for s in seeds]
        if any(e is None for e in evals):
            continue
        trains = [by_id[f"train/{method}/lr{lr:g}/seed{s}"] for s in seeds]
        row: dict[str, Any] = {"learning_rate": lr, "val_losses": choice["val_losses"], "grid": choice["grid"]}
        row["in_domain"] = [e["in_domain"]["accuracy"] for e in evals]
        row["transfer"] = {t: [e["transfer"][t]["accuracy"] for e in evals] for t in evals[0]["transfer"]}
        row["forgetting_kl"] = [e["forgetting_kl"] for e in evals]
        row["forgetting_nll"] = [e["forgetting_nll"] for e in evals]
        costs = ("train_seconds", "train_cpu_seconds", "peak_memory_bytes", "memory_before_bytes")
        for field in (*costs, "trainable_params", "adapter_bytes"):
            row[field] = [t[field] for t in trains]
        summary["methods"][method] = row
    return summary


def report(path: Path) -> str:
    summary = summarize(path)
    methods, s = summary["methods"], summary["settings"]
    lines = [f"Records: `{path.name}`; {len(methods)} methods complete of {len(s['methods'].split(','))}.", ""]
    transfer = [t for t in s["transfer"].split(",") if t]
    head = ["method", "lr", f"{s['data']} (in-domain)", *transfer, "KL from base", "NLL of base text"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = summary["base"]
    if base:
        cells = ["base", "-", f"{100 * base['in_domain']['accuracy']:.1f}"]
        cells += [f"{100 * base['transfer'][t]['accuracy']:.1f}" for t in transfer]
        cells += [f"{base['forgetting_kl']:.4f}", f"{base['forgetting_nll']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")

    def pm(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
        mean, sd = _mean_sd([scale * v for v in values])
        return f"{mean:.{digits}f} ± {sd:.{digits}f}"

    for method, row in methods.items():
        edge = row["learning_rate"] in (min(row["grid"]), max(row["grid"]))  # the best rate may lie outside
        cells = [method, f"{row['learning_rate']:g}" + (" (grid edge)" if edge else ""), pm(row["in_domain"])]
        cells += [pm(row["transfer"][t]) for t in transfer]
        cells += [pm(row["forgetting_kl"], 1.0, 4), pm(row["forgetting_nll"], 1.0, 3)]
        lines.append("| " + " | ".join(cells) + " |")
    if "lora" in methods:
        lines += ["", "Paired by seed, method minus LoRA (mean ± sd over seeds):", ""]
        head = ["method", "in-domain (points)", *[f"{t} (points)" for t in transfer], "KL ratio to LoRA"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lora = methods["lora"]
        for method, row in methods.items():
            if method == "lora":
                continue
            cells = [method, pm([a - b for a, b in zip(row["in_domain"], lora["in_domain"], strict=True)])]
            cells += [
                pm([a - b for a, b in zip(row["transfer"][t], lora["transfer"][t], strict=True)]) for t in transfer
            ]
            ratios = [a / b for a, b in zip(row["forgetting_kl"], lora["forgetting_kl"], strict=True)]
            cells.append(pm(ratios, 1.0, 2))
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| method | trainable | adapter | training (wall) | training (CPU) | peak memory |",
        "|---|---|---|---|---|---|",
    ]
    for method, row in methods.items():
        lines.append(
            f"| {method} | {row['trainable_params'][0]:,} | {row['adapter_bytes'][0] / 1e6:.2f} MB | "
            f"{statistics.fmean(row['train_seconds']):.0f} s | {statistics.fmean(row['train_cpu_seconds']):.0f} s | "
            f"{max(row['peak_memory_bytes']) / 2**20:,.0f} MiB |"
        )
    return "\n".join(lines)


def plot(path: Path, output: Path) -> None:
    """In-domain accuracy against forgetting (KL from the base model), mean ± sd over seeds per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summarize(path)["methods"]
    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    for method, row in methods.items():
        acc, acc_sd = _mean_sd([100 * v for v in row["in_domain"]])
        kl, kl_sd = _mean_sd(row["forgetting_kl"])
        axes.errorbar(kl, acc, xerr=kl_sd, yerr=acc_sd, fmt="o", capsize=3, label=method)
        axes.annotate(method, (kl, acc), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axes.set_xlabel("forgetting: mean KL(base || tuned) per token, lower is better")
    axes.set_ylabel("in-domain accuracy (%)")
    axes.set_title("Quality study: mean ± sd over seeds")
    figure.tight_layout()
    figure.savefig(output, dpi=120)


# ---------------------------------------------------------------------------------------------------- cli


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny budget: every method through the pipeline")
    parser.add_argument("--model", help="hub id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--output", help="records file (default: docs/results/quality.json; --quick: outputs/)")
    parser.add_argument("--work-dir", help="snapshots and trainer scratch (default: outputs/quality[-quick])")
    parser.add_argument("--restart", action="store_true", help="discard the records of --output first")
    parser.add_argument("--report", action="store_true", help="print the markdown tables of --output and exit")
    parser.add_argument("--plot", metavar="FILE.png", help="with --report: also draw accuracy against forgetting")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machines are shared)")
    parser.add_argument("--eval-batch-size", type=int, default=50, help="greedy decoding batch (no effect on results)")
    add_setting_options(parser, FULL, QUICK)
    args = parser.parse_args(argv)
    settings = fill_settings(args, FULL, QUICK, "quality", "docs/results/quality.json", RESULT_KEYS)
    return args, settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    code_version()
    if args.report:
        print(report(Path(args.output)))
        if args.plot:
            plot(Path(args.output), Path(args.plot))
        return 0
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    status = Study(args, settings).run()
    print(f"python {platform.python_version()}, torch {torch.__version__}; {time.perf_counter() - started:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
