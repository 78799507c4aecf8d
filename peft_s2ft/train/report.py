"""What `peft-s2ft train` measured, and how it is printed and saved.

Kept apart from the training flow so the numbers have one definition: peak memory is the process's
resident-set peak (plus the CUDA allocator's peak on a GPU), adapter size is the bytes on disk.
"""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ADAPTER_FILE = "adapter_model.safetensors"
REPORT_FILE = "train_report.json"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_cuda_bytes() -> int | None:
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def adapter_bytes(output_dir: str | Path) -> int:
    return (Path(output_dir) / ADAPTER_FILE).stat().st_size


@dataclass
class TrainReport:
    method: str
    model: str
    task: str
    train_examples: int
    eval_examples: int
    max_steps: int
    trainable_params: int
    base_params: int
    adapter_bytes: int
    train_seconds: float
    train_cpu_seconds: float
    total_seconds: float
    peak_rss_bytes: int
    peak_cuda_bytes: int | None
    base_accuracy: float | None
    tuned_accuracy: float | None
    base_loss: float | None
    tuned_loss: float | None
    final_train_loss: float | None
    reload_max_abs_diff: float
    reload_ok: bool
    output_dir: str

    def save(self) -> Path:
        path = Path(self.output_dir) / REPORT_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    def format(self) -> str:
        """A short human-readable summary."""
        lines = [f"== peft-s2ft train: {self.method} on {self.model} ({self.task}) =="]
        if self.base_accuracy is not None and self.tuned_accuracy is not None:
            n = self.eval_examples
            lines.append(
                f"accuracy (exact match, {n} held-out): base {_pct(self.base_accuracy)} "
                f"({round(self.base_accuracy * n)}/{n}) -> fine-tuned {_pct(self.tuned_accuracy)} "
                f"({round(self.tuned_accuracy * n)}/{n})"
            )
        if self.base_loss is not None and self.tuned_loss is not None:
            lines.append(
                f"eval loss (completion tokens): base {self.base_loss:.4f} -> fine-tuned {self.tuned_loss:.4f}"
            )
        share = self.trainable_params / self.base_params if self.base_params else 0.0
        lines += [
            f"trainable params: {self.trainable_params:,} of {self.base_params:,} base params ({share:.3%})",
            f"adapter size: {self.adapter_bytes:,} bytes ({self.adapter_bytes / 2**20:.2f} MiB) in {self.output_dir}",
            f"training: {self.max_steps} steps on {self.train_examples} examples in {self.train_seconds:.1f} s "
            f"({self.train_cpu_seconds:.0f} CPU-s), final train loss {_maybe(self.final_train_loss)}; "
            f"whole run {self.total_seconds:.1f} s",
            f"peak memory: {self.peak_rss_bytes / 2**20:,.0f} MiB RSS"
            + (f", {self.peak_cuda_bytes / 2**20:,.0f} MiB CUDA allocated" if self.peak_cuda_bytes is not None else ""),
            f"reload check: {'OK' if self.reload_ok else 'FAILED'} "
            f"(max |logit difference| {self.reload_max_abs_diff:.2e} after PeftModel.from_pretrained)",
        ]
        return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _maybe(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
