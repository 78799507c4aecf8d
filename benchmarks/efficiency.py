"""Efficiency of S2FT against its lower bound, full fine-tuning and LoRA, in one process.

For each model and shape every method is measured in the same process, with repeats interleaved
round-robin and medians reported, and every figure is also given as a ratio to `limit`: the cheapest
possible step, all weights frozen and only input gradients back-propagated (see docs/benchmarks.md).

    python benchmarks/efficiency.py --quick
    python benchmarks/efficiency.py --model smollm2-135m,llama-1b-shape --seq-len 256,1024 --batch 4 \\
        --output results.json --plot results.png
    python benchmarks/efficiency.py --model mixtral-shape --seq-len 256 --batch 4 --output mixtral.json
    python benchmarks/efficiency.py --methods qlimit,qlora,qs2ft   # on an nf4 base (QLoRA vs QS2FT)

Random-init shapes of other families (`benchmarks/models.py`: phi3-shape, gpt2-shape, gpt-neox-shape, bert-shape,
mixtral-shape, and tiny-* versions) train under their family's task (BERT: sequence classification, with its
classification loss) and LoRA targets (`benchmarks/methods.py`). A method that does not apply to a model
(`lora-experts` without fused experts, `s2ft-permute` where S2FT refuses it: MoE layers, ALiBi) is left out and
named, with the reason, in the `skipped_methods` of that model's records.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

# Run as a script, the repository root is not on the path; as a module it already is.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.measure import StepTimes, adapter_file_bytes, instrumented_step, timed_step
from benchmarks.methods import (
    ALL_METHODS,
    LORA_METHODS,
    MATCHED_METHODS,
    METHODS,
    QUANTIZED_METHODS,
    Trainee,
    copy_for,
    lora_targets,
    matched_lora_rank,
    prepare,
    s2ft_trainable_count,
)
from benchmarks.models import DTYPES, EMBEDDED, RANDOM_SHAPES, load_base_model, task_type
from benchmarks.report import add_ratios, format_table, write_json

QUICK = {"model": EMBEDDED, "batch": 2, "seq_len": "128", "repeats": 2}
DEFAULTS = {"model": EMBEDDED, "batch": 4, "seq_len": "256", "repeats": 4}
WARMUP_SHAPE = (1, 16)  # creates the optimizer state before anything is measured


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        help=f"Comma list of {EMBEDDED}, random-init shapes ({', '.join(RANDOM_SHAPES)}), hub ids or folders.",
    )
    parser.add_argument("--batch", type=int, help="Sequences per step (default 4).")
    parser.add_argument("--seq-len", help="Comma list of tokens per sequence (default 256).")
    parser.add_argument(
        "--max-tokens",
        type=int,
        help="Cap batch x seq-len: the batch shrinks for long sequences (at least 1).",
    )
    parser.add_argument("--repeats", type=int, help="Timed steps per method and shape (default 4).")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"Comma list (default: every method on the float base; also {', '.join(QUANTIZED_METHODS)}).",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--lora-rank", type=int, help="Fixed LoRA rank instead of matching S2FT's budget.")
    parser.add_argument(
        "--peft-input",
        choices=("embeds", "ids"),
        default="embeds",
        help="How PEFT methods are fed: like limit (default) or with plain input_ids.",
    )
    parser.add_argument("--output", help="Write the records to this JSON file.")
    parser.add_argument("--plot", help="Write a PNG of the ratios to limit (needs matplotlib).")
    parser.add_argument("--quick", action="store_true", help=f"A short run: {QUICK}, unless given.")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    unknown = set(_split(args.methods)) - set(ALL_METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(ALL_METHODS)}.")
    return args


def _split(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def code_version() -> str | None:
    """The checkout's commit (with "+modified" for uncommitted changes), or None outside a git checkout."""
    repo = Path(__file__).resolve().parents[1]
    try:
        run = {"cwd": repo, "capture_output": True, "text": True, "timeout": 10, "check": True}
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+modified" if dirty else "")


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    found = {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    # Allocator settings change absolute times (page faults), so a record says which were in force.
    found["malloc_env"] = {key: value for key, value in os.environ.items() if key.startswith("MALLOC_")}
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
    return found


def build_trainees(
    base: torch.nn.Module, methods: list[str], args: argparse.Namespace, task: str = "CAUSAL_LM"
) -> tuple[list[Trainee], dict[str, str]]:
    """One copy of `base` per method; LoRA ranks and PaCA's column count matched to the default S2FT's trainable count.

    Also returns the methods that do not apply to this model, each with the reason: a LoRA method without
    targets in its family (`lora-experts` on a model without fused experts), or permute mode where S2FT refuses
    it (mixture-of-experts layers, ALiBi).
    """
    base.requires_grad_(False)
    trainees, skipped = {}, {}
    for method in methods:
        if method in LORA_METHODS and lora_targets(base, method) is None:
            skipped[method] = f"no {method} targets for model_type {base.config.model_type!r}"
    for method in (m for m in methods if m not in MATCHED_METHODS):
        try:
            trainees[method] = prepare(method, copy_for(method, base), peft_feed=args.peft_input, task_type=task)
        except ValueError as error:
            if method != "s2ft-permute":
                raise
            skipped[method] = str(error)
    lora_methods = [m for m in methods if m in MATCHED_METHODS and m not in skipped]
    if any(m == "paca" or args.lora_rank is None for m in lora_methods):
        budget = trainees["s2ft"].trainable_params() if "s2ft" in trainees else s2ft_trainable_count(base, task)
    for method in lora_methods:
        fixed = args.lora_rank if method in LORA_METHODS else None  # --lora-rank is LoRA's; PaCA's r is matched
        rank = fixed or matched_lora_rank(base, method, budget, task)
        model = copy_for(method, base)
        trainees[method] = prepare(method, model, lora_rank=rank, peft_feed=args.peft_input, task_type=task)
    for method, reason in skipped.items():
        print(f"  skipping {method}: {reason}", flush=True)
    return [trainees[m] for m in methods if m in trainees], skipped


def measure_shape(trainees: list[Trainee], ids: torch.Tensor, repeats: int) -> list[tuple]:
    """Figures of each trainee on `ids`: one instrumented step each, then `repeats` interleaved timed ones."""
    figures = [instrumented_step(t, ids) for t in trainees]
    times: list[list[StepTimes]] = [[] for _ in trainees]
    for repeat in range(repeats):
        # Rotate the order so that no method always runs right after the same neighbour.
        for k in range(len(trainees)):
            i = (k + repeat) % len(trainees)
            times[i].append(timed_step(trainees[i], ids))
        summary = ", ".join(f"{t.method} {ts[-1].step_s:.2f}s" for t, ts in zip(trainees, times, strict=True))
        print(f"  repeat {repeat + 1}/{repeats}: {summary}", flush=True)
    return list(zip(figures, times, strict=True))


def record(trainee: Trainee, figures, times: list[StepTimes], context: dict, adapter_bytes: int) -> dict:
    """One method's figures at one shape; `context` says where (model, shape, environment, skipped methods)."""

    def median(phase: str) -> float:
        return statistics.median(getattr(t, phase) for t in times)

    return {
        **context,
        "method": trainee.method,
        "trainable_params": trainee.trainable_params(),
        "lora_rank": trainee.lora_rank if trainee.method in LORA_METHODS else None,
        "paca_r": trainee.lora_rank if trainee.method == "paca" else None,
        "input": trainee.feed,
        "step_time_s": median("step_s"),
        "forward_s": median("forward_s"),
        "backward_s": median("backward_s"),
        "optimizer_s": median("optimizer_s"),
        "step_times_s": [t.step_s for t in times],
        "step_cpu_s": median("cpu_s"),
        "saved_bytes": figures.saved_bytes,
        "saved_param_bytes": figures.saved_param_bytes,
        "saved_activation_bytes": figures.saved_bytes - figures.saved_param_bytes,
        "peak_mem_bytes": figures.peak_mem_bytes,
        "resident_bytes": figures.resident_bytes,
        "peak_step_bytes": figures.peak_step_bytes,
        "flops": figures.flops,
        "adapter_bytes": adapter_bytes,
    }


def run_model(name: str, methods: list[str], args: argparse.Namespace, environment: dict) -> list[dict]:
    device = torch.device(args.device)
    print(f"[{name}] loading", flush=True)
    base = load_base_model(name, DTYPES[args.dtype], seed=args.seed).to(device)
    vocab, model_type, task = base.config.vocab_size, base.config.model_type, task_type(name)
    trainees, skipped = build_trainees(base, methods, args, task)
    del base
    generator = torch.Generator().manual_seed(args.seed)
    for trainee in trainees:
        timed_step(trainee, torch.randint(0, vocab, WARMUP_SHAPE, generator=generator).to(device))
    adapter_bytes = [adapter_file_bytes(t) for t in trainees]
    records = []
    for seq_len in (int(s) for s in _split(args.seq_len)):
        batch = args.batch if args.max_tokens is None else max(1, min(args.batch, args.max_tokens // seq_len))
        print(f"[{name}] batch {batch} x {seq_len}", flush=True)
        ids = torch.randint(0, vocab, (batch, seq_len), generator=generator).to(device)
        context = {
            "model": name,
            "model_type": model_type,
            "task_type": task,
            "batch": batch,
            "seq_len": seq_len,
            **environment,
            "skipped_methods": skipped,
        }
        for trainee, (figures, times), size in zip(
            trainees, measure_shape(trainees, ids, args.repeats), adapter_bytes, strict=True
        ):
            records.append(record(trainee, figures, times, context, size))
    del trainees
    gc.collect()
    return records


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft
    import transformers

    environment = {
        "dtype": args.dtype,
        "device": args.device,
        "repeats": args.repeats,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
        "code_version": code_version(),
        "machine": machine(),
    }
    methods = _split(args.methods)
    records = [r for name in _split(args.model) for r in run_model(name, methods, args, environment)]
    add_ratios(records)
    print(format_table(records))
    if args.output:
        write_json(records, args.output)
    if args.plot:
        from benchmarks.plot import plot_ratios

        plot_ratios(records, args.plot)
    return records


if __name__ == "__main__":
    main()
