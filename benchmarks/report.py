"""Results as records: ratios to the lower bound, a printed table and a JSON file."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

# Fields that get a "<field>_ratio" (value / the limit's value measured in the same run and shape).
RATIO_FIELDS = ("step_time_s", "step_cpu_s", "saved_bytes", "saved_activation_bytes", "peak_mem_bytes", "flops")
GROUP_FIELDS = ("model", "batch", "seq_len", "dtype", "device")
MIB = 2**20


# Methods on a quantized base are compared with the quantized lower bound, the others with `limit`.
REFERENCE = {"qlimit": "qlimit", "qlora": "qlimit", "qs2ft": "qlimit"}


def add_ratios(records: list[dict]) -> None:
    """Add ratios to the reference record (`limit`, or `qlimit` for methods on a quantized base) of the same group;
    None where there is no reference or it is zero."""
    limits = {(r["method"], *(r[f] for f in GROUP_FIELDS)): r for r in records if r["method"] in ("limit", "qlimit")}
    for record in records:
        reference = REFERENCE.get(record["method"], "limit")
        limit = limits.get((reference, *(record[f] for f in GROUP_FIELDS)))
        for field in RATIO_FIELDS:
            base = limit[field] if limit else None
            record[f"{field}_ratio"] = record[field] / base if base else None


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(records: Iterable[dict]) -> str:
    """A Markdown table, one row per record, ratios to limit next to absolute figures; then the skipped methods."""
    records = list(records)
    header = (
        "| model | batch x seq | method | trainable | step s | step/limit | CPU/limit | saved MiB | saved/limit "
        "| peak MiB | peak/limit | GFLOP | FLOP/limit | adapter MB |"
    )
    rows = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for r in records:
        rows.append(
            f"| {r['model']} | {r['batch']}x{r['seq_len']} | {r['method']} | {r['trainable_params']:,} "
            f"| {r['step_time_s']:.2f} | {_ratio(r['step_time_s_ratio'])} | {_ratio(r['step_cpu_s_ratio'])} "
            f"| {r['saved_bytes'] / MIB:.0f} | {_ratio(r['saved_bytes_ratio'])} "
            f"| {r['peak_mem_bytes'] / MIB:.0f} | {_ratio(r['peak_mem_bytes_ratio'])} "
            f"| {r['flops'] / 1e9:.0f} | {_ratio(r['flops_ratio'])} | {r['adapter_bytes'] / 1e6:.2f} |"
        )
    skipped = {r["model"]: r.get("skipped_methods") or {} for r in records}
    notes = [f"{model}: {method} skipped: {why}" for model, found in skipped.items() for method, why in found.items()]
    return "\n".join(rows + ([""] if notes else []) + notes)


def write_json(records: list[dict], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(records, indent=2) + "\n")
