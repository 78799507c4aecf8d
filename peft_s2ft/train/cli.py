"""`peft-s2ft train`: fine-tune, evaluate, save, reload-check and report, in one offline command.

Defaults are sized for a 2-core CPU: the embedded SmolLM2-135M-Instruct learns GSM8K-style word problems
from reasoning-gym with the paper's S2FT recipe in about ten minutes. `--method lora` trains a LoRA with
the same number of trainable parameters on the same data, for comparison.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

from ..config import ALLOCATIONS, SELECTION_STRATEGIES

DEFAULTS = dict(max_steps=64, eval_samples=80, batch_size=8, max_length=192, max_number=100, eval_batch_size=40, seed=0)
LEARNING_RATES = {"s2ft": 3e-3, "lora": 1e-3}
EMBEDDED_TAG = "smollm2"
RELOAD_CHECK_ROWS = 4
# A reloaded adapter must reproduce the fine-tuned logits up to float noise: same weights, same ops.
RELOAD_ATOL = RELOAD_RTOL = 1e-4


class UsageError(RuntimeError):
    """A problem with the user's inputs, reported as one line without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-s2ft", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="fine-tune a causal LM with S2FT (or LoRA) and report accuracy, size, time and memory",
        description="Fine-tune, evaluate before and after, save the adapter, check that it reloads, report.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = train.add_argument_group("model and data")
    data.add_argument(
        "--model", help="hub id or local folder (default: the embedded SmolLM2-135M-Instruct, 'smollm2-135m')"
    )
    data.add_argument(
        "--data",
        metavar="FILE.jsonl",
        help="training data, one JSON object with string 'prompt' and 'completion' per line (default: "
        "reasoning-gym gsm_symbolic). Evaluation is exact match of the final number when every held-out row has "
        "a gold number (an 'answer' field, a completion ending in '#### N', or a bare-number completion), "
        "otherwise the loss on the completion tokens",
    )
    data.add_argument(
        "--eval-data", metavar="FILE.jsonl", help="held-out rows in the same format (default: a hold-out of --data)"
    )
    data.add_argument("--train-samples", type=int, help="training examples (default: one pass, max-steps x batch-size)")
    data.add_argument("--eval-samples", type=int, default=DEFAULTS["eval_samples"])
    data.add_argument(
        "--max-length",
        type=int,
        default=DEFAULTS["max_length"],
        help="longest prompt + completion in tokens: longer training rows are skipped, and the default task only "
        "draws problems (train and test alike) whose worked solution fits",
    )
    data.add_argument(
        "--max-number",
        type=float,
        default=DEFAULTS["max_number"],
        help="the default task only draws problems (train and test alike) whose worked solution uses numbers up to "
        "this; a 135M model learns the reasoning in minutes but not four-digit arithmetic. 0 means no limit",
    )
    data.add_argument("--output-dir", help="where the adapter and train_report.json go (default: outputs/METHOD-MODEL)")

    optim = train.add_argument_group("training")
    optim.add_argument(
        "--method",
        choices=("s2ft", "lora"),
        default="s2ft",
        help="lora: PEFT LoRA on q,k,v,up,down projections, its rank matched to S2FT's trainable parameters",
    )
    optim.add_argument("--max-steps", type=int, default=DEFAULTS["max_steps"])
    optim.add_argument(
        "--learning-rate", type=float, help=f"AdamW peak learning rate, linear decay (default: {LEARNING_RATES})"
    )
    optim.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    optim.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="data, selection and training seed")
    optim.add_argument("--lora-rank", type=int, help="override the parameter-matched LoRA rank")

    budget = train.add_argument_group("S2FT budget (also what the LoRA rank is matched to)")
    budget.add_argument("--trainable-ratio", type=float, default=0.01)
    budget.add_argument("--attention-share", type=float, default=0.5)
    budget.add_argument("--heads-per-layer", type=int)
    budget.add_argument("--channels-per-layer", type=int)
    budget.add_argument("--selection", choices=SELECTION_STRATEGIES, default="random")
    budget.add_argument("--allocation", choices=ALLOCATIONS, default="uniform")
    budget.add_argument(
        "--calibration-samples",
        type=int,
        help="training examples the data-driven selections (activation_*, weight_activation_*, gradient_*) score "
        "heads and channels on (default: 1%% of the training examples, as the paper, at least one batch)",
    )

    evaluation = train.add_argument_group("evaluation")
    evaluation.add_argument("--eval-batch-size", type=int, default=DEFAULTS["eval_batch_size"])
    evaluation.add_argument(
        "--max-new-tokens", type=int, help="greedy generation length (default: longest training completion + 16)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_train(args)
    except UsageError as error:
        print(f"peft-s2ft: error: {error}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------------- inputs


def _validate(args: argparse.Namespace) -> None:
    if args.train_samples is None:
        args.train_samples = args.max_steps * args.batch_size
    positive = ("max_steps", "train_samples", "eval_samples", "batch_size", "eval_batch_size", "max_length")
    for name in positive + ("max_new_tokens", "lora_rank", "calibration_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1.")
    if not args.max_number >= 0:
        raise UsageError("--max-number must be 0 (no limit) or positive.")
    if args.learning_rate is not None and not args.learning_rate > 0:
        raise UsageError("--learning-rate must be positive.")
    if args.eval_data is not None and args.data is None:
        raise UsageError("--eval-data needs --data.")
    from ..calibration import DATA_DRIVEN

    if args.calibration_samples is not None and (args.method != "s2ft" or args.selection not in DATA_DRIVEN):
        raise UsageError(
            "--calibration-samples only applies to --method s2ft with a data-driven --selection "
            f"({', '.join(DATA_DRIVEN)})."
        )


def _load_tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise UsageError(f"cannot load the tokenizer of {source!r}: {error}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise UsageError(f"the tokenizer of {source!r} has neither a pad nor an end-of-sequence token.")
    return tokenizer


def _load_model(source: str, device: str) -> Any:
    """The base model in float32: adapters train reliably in it, and the reload check compares exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device)
    except OSError as error:
        raise UsageError(f"cannot load model {source!r}: {error}") from error


def _load_splits(args: argparse.Namespace, tokenizer: Any) -> tuple[Any, Any, str]:
    from .task import DataError, encode_example, gsm_symbolic, jsonl_splits, largest_number

    try:
        if args.data is None:

            def fits(question: str, solution: str) -> bool:
                if args.max_number and largest_number(solution) > args.max_number:
                    return False
                return encode_example(tokenizer, question, solution, args.max_length) is not None

            train, test = gsm_symbolic(args.train_samples, args.eval_samples, args.seed, keep=fits)
            return train, test, "gsm_symbolic"
        train, test = jsonl_splits(args.data, args.train_samples, args.eval_samples, args.seed, args.eval_data)
    except DataError as error:
        raise UsageError(str(error)) from error
    return train, test, Path(args.data).name


def _output_dir(args: argparse.Namespace) -> Path:
    if args.output_dir:
        return Path(args.output_dir)
    tag = EMBEDDED_TAG if args.model in (None, "smollm2-135m") else Path(args.model.rstrip("/")).name
    return Path("outputs") / f"{args.method}-{tag}"


# --------------------------------------------------------------------------------------------- methods


def s2ft_config(args: argparse.Namespace, **overrides: Any) -> Any:
    from .. import S2FTConfig

    fields = dict(
        task_type="CAUSAL_LM",
        trainable_ratio=args.trainable_ratio,
        attention_share=args.attention_share,
        heads_per_layer=args.heads_per_layer,
        channels_per_layer=args.channels_per_layer,
        selection=args.selection,
        allocation=args.allocation,
        seed=args.seed,
    )
    try:
        return S2FTConfig(**{**fields, **overrides})
    except ValueError as error:
        raise UsageError(str(error)) from error


def matched_lora_rank(args: argparse.Namespace, source: str) -> tuple[int, int]:
    """The LoRA rank whose parameter count is closest to S2FT's with the same budget, and S2FT's count.

    Both are counted on a weightless (meta-device) copy of the model; the selection is forced to 'random'
    because the count depends only on the budget, not on which heads and channels are picked.
    """
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import lora_baseline

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):  # two shells: get_peft_model rewrites the modules of the one it wraps
        shell, s2ft_shell = (AutoModelForCausalLM.from_config(config) for _ in range(2))
    s2ft = get_peft_model(s2ft_shell, s2ft_config(args, selection="random"))
    count = sum(p.numel() for p in s2ft.parameters() if p.requires_grad)
    try:
        return lora_baseline.matched_lora_rank(shell, lora_baseline.PAPER_LORA_TARGETS, count), count
    except ValueError as error:
        raise UsageError(f"--method lora: {error}") from error


def peft_config(args: argparse.Namespace, source: str) -> Any:
    if args.method == "s2ft":
        return s2ft_config(args)
    from .lora_baseline import PAPER_LORA_TARGETS, lora_config

    rank = args.lora_rank
    if rank is None:
        rank, count = matched_lora_rank(args, source)
        print(f"LoRA rank {rank} matches S2FT's {count:,} trainable parameters")
    return lora_config(rank, PAPER_LORA_TARGETS)


def calibrate_on_training_rows(
    model: Any, config: Any, rows: list[dict], args: argparse.Namespace, pad_token_id: int
) -> None:
    """Score heads and channels for a data-driven selection on the first training examples."""
    from ..calibration import calibrate_selection
    from .task import CompletionCollator

    count = args.calibration_samples or max(args.batch_size, round(0.01 * len(rows)))
    count = min(count, len(rows))
    collate = CompletionCollator(pad_token_id)
    batches = [collate(rows[i : min(i + args.batch_size, count)]) for i in range(0, count, args.batch_size)]
    scores = calibrate_selection(model, config, batches)
    print(f"selection '{config.selection}' calibrated on {count} training examples ({scores.tokens} tokens)")


# -------------------------------------------------------------------------------------------- training


def _accepts(model: Any, argument: str) -> bool:
    """Whether the (wrapped) model's forward takes `argument` (most transformers causal LMs take logits_to_keep)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return argument in inspect.signature(inner.forward).parameters


def train_adapter(
    model: Any, rows: list[dict], args: argparse.Namespace, pad_token_id: int, trainer_class: Any = None
) -> tuple[float, float, Any]:
    """Train with transformers.Trainer (or `trainer_class`, a subclass adding a loss term, as the quality study's
    SORSA baseline does); returns wall and CPU seconds spent and the last logged training loss.

    CPU seconds (all threads of this process) tell how much work training was on a machine shared with
    other jobs, where wall time mostly tells how busy the machine was.
    """
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from .task import CompletionCollator

    on_cpu = not torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=str(_output_dir(args)),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=LEARNING_RATES[args.method] if args.learning_rate is None else args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        weight_decay=0.0,
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=on_cpu,
        dataloader_pin_memory=not on_cpu,
        train_sampling_strategy="group_by_length",  # less padding; batches still come in random order
        disable_tqdm=False,
    )
    collator = CompletionCollator(pad_token_id, trim_logits=_accepts(model, "logits_to_keep"))
    trainer = (trainer_class or Trainer)(
        model=model, args=training_args, train_dataset=Dataset.from_list(rows), data_collator=collator
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return seconds, cpu_seconds, (losses[-1] if losses else None)


def _logits(model: Any, batch: dict[str, Any]) -> Any:
    """Logits at the non-padding positions, on the CPU."""
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[batch["attention_mask"].bool()].float().cpu()


def reload_check(
    expected: Any, batch: dict[str, Any], source: str, output_dir: Path, device: str
) -> tuple[bool, float]:
    """Load the saved adapter onto a fresh base model; do its logits match the trained model's (`expected`)?"""
    import torch
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(_load_model(source, device), output_dir)
    actual = _logits(reloaded, batch)
    return bool(torch.allclose(actual, expected, atol=RELOAD_ATOL, rtol=RELOAD_RTOL)), float(
        (actual - expected).abs().max()
    )


# ----------------------------------------------------------------------------------------------- train


def run_train(args: argparse.Namespace) -> int:
    """The `train` command; returns the exit status (1 when the reloaded adapter does not match)."""
    import torch
    from peft import get_peft_model
    from transformers import set_seed

    from ..calibration import needs_calibration
    from .embedded_model import ModelUnavailableError, resolve_model
    from .report import TrainReport, adapter_bytes, peak_cuda_bytes, peak_rss_bytes
    from .task import CompletionCollator, completion_token_lengths, encode_split, evaluate

    _validate(args)
    started = time.perf_counter()
    set_seed(args.seed)
    try:
        source = resolve_model(args.model)
    except ModelUnavailableError as error:
        raise UsageError(str(error)) from error
    device = "cuda" if torch.cuda.is_available() else "cpu"
    output_dir = _output_dir(args)

    tokenizer = _load_tokenizer(source)
    train_split, test_split, task_name = _load_splits(args, tokenizer)
    train_rows, dropped = encode_split(tokenizer, train_split, args.max_length)
    if not train_rows:
        raise UsageError(f"every training example is longer than --max-length {args.max_length} tokens.")
    if dropped:
        print(f"skipped {dropped} training examples longer than {args.max_length} tokens")
    longest = max(completion_token_lengths(tokenizer, train_split.completions))
    max_new_tokens = args.max_new_tokens or longest + 16
    print(f"{task_name}: {len(train_rows)} training and {len(test_split)} held-out examples; {source} on {device}")

    def run_eval(model: Any, desc: str) -> Any:
        return evaluate(model, tokenizer, test_split, args.eval_batch_size, max_new_tokens, args.max_length, desc)

    model = _load_model(source, device)
    base = run_eval(model, "eval base model")
    base_params = sum(p.numel() for p in model.parameters())  # the base model's, as the paper's "1%" counts them
    config = peft_config(args, source)
    if args.method == "s2ft" and needs_calibration(config.selection):
        calibrate_on_training_rows(model, config, train_rows, args, tokenizer.pad_token_id)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    train_seconds, train_cpu_seconds, final_loss = train_adapter(model, train_rows, args, tokenizer.pad_token_id)
    tuned = run_eval(model, f"eval {args.method} model")
    model.save_pretrained(output_dir)
    peak_rss, peak_cuda = peak_rss_bytes(), peak_cuda_bytes()  # before the reload check loads a second model

    check_rows, _ = encode_split(tokenizer, test_split.head(RELOAD_CHECK_ROWS), args.max_length)
    batch = CompletionCollator(tokenizer.pad_token_id)(check_rows or train_rows[:RELOAD_CHECK_ROWS])
    batch = {key: value.to(device) for key, value in batch.items()}
    expected = _logits(model, batch)
    del model
    gc.collect()
    reload_ok, reload_diff = reload_check(expected, batch, source, output_dir, device)

    report = TrainReport(
        method=args.method,
        model=args.model or "smollm2-135m",
        task=task_name,
        train_examples=len(train_rows),
        eval_examples=len(test_split),
        max_steps=args.max_steps,
        trainable_params=trainable,
        base_params=base_params,
        adapter_bytes=adapter_bytes(output_dir),
        train_seconds=train_seconds,
        train_cpu_seconds=train_cpu_seconds,
        total_seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss,
        peak_cuda_bytes=peak_cuda,
        base_accuracy=base.accuracy,
        tuned_accuracy=tuned.accuracy,
        base_loss=base.loss,
        tuned_loss=tuned.loss,
        final_train_loss=final_loss,
        reload_max_abs_diff=reload_diff,
        reload_ok=reload_ok,
        output_dir=str(output_dir),
    )
    report.save()
    print(report.format())
    return 0 if reload_ok else 1


if __name__ == "__main__":
    sys.exit(main())
