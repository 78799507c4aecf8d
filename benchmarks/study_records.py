"""What the long studies (fusion, quality) share: resumable JSON records and what a record says about its run.

A study writes one record per finished run as soon as it ends, atomically, so that a killed study resumes where it
stopped; each record also says which code made it and what else was running on the machine.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
FORMAT_VERSION = 1


class Records:
    """The study's records, keyed by id, saved atomically after each new one."""

    def __init__(self, path: Path, settings: dict[str, Any], restart: bool) -> None:
        self.path, self.settings = path, settings
        self.by_id: dict[str, dict[str, Any]] = {}
        if path.is_file() and not restart:
            stored = json.loads(path.read_text())
            if stored.get("settings") != settings:
                raise SystemExit(
                    f"{path} holds records made with other settings:\n  {stored.get('settings')}\nnot\n  {settings}\n"
                    "Pass --restart to discard them, or another --output."
                )
            self.by_id = {r["id"]: r for r in stored["records"]}

    def __contains__(self, key: str) -> bool:
        return key in self.by_id

    def __getitem__(self, key: str) -> dict[str, Any]:
        return self.by_id[key]

    def add(self, record: dict[str, Any]) -> None:
        self.by_id[record["id"]] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        body = {"format": FORMAT_VERSION, "settings": self.settings, "records": list(self.by_id.values())}
        tmp.write_text(json.dumps(body, indent=1, default=jsonable) + "\n")
        os.replace(tmp, self.path)


def jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    if hasattr(value, "item"):
        return value.item()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


def machine_state() -> dict[str, Any]:
    """Load average and the busiest other processes: what this run shared the CPUs with."""
    state: dict[str, Any] = {"loadavg": list(os.getloadavg()), "cpus": os.cpu_count()}
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid,pcpu,etimes,args", "--sort=-pcpu", "--no-headers"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return state
    others = []
    for line in out.splitlines():
        pid, pcpu, etimes, args = (line.split(None, 3) + ["", "", "", ""])[:4]
        if int(pid) == os.getpid() or float(pcpu) < 20 or args.startswith("ps "):
            continue
        others.append({"pid": int(pid), "pcpu": float(pcpu), "elapsed_s": int(etimes), "args": args[:100]})
    state["other_processes"] = others[:4]
    return state


@functools.cache
def code_version() -> dict[str, Any]:
    """The commit of the repository and whether peft_s2ft/ differs from it (others edit it concurrently).

    Cached: main() asks first, before anything is imported, so it names the code this process runs.
    """

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "peft_s2ft_dirty": bool(git("status", "--porcelain", "peft_s2ft")),
    }


def add_setting_options(parser: Any, full: dict[str, Any], quick: dict[str, Any]) -> None:
    """One `--name` option per result-deciding setting; unset, it takes the full or the --quick value."""
    for key, value in full.items():
        kind = float if isinstance(value, float) else int if isinstance(value, int) or value is None else str
        parser.add_argument(f"--{key.replace('_', '-')}", type=kind, help=f"default {value} (--quick: {quick[key]})")


def fill_settings(
    args: Any, full: dict[str, Any], quick: dict[str, Any], study: str, records: str, result_keys: tuple[str, ...]
) -> dict[str, Any]:
    """Give every setting left unset on the command line its default (the --quick one with --quick), and
    --output / --work-dir theirs (`records` in the repository; --quick writes under outputs/). Returns the
    settings that decide the results, the model's included: what a records file must match to be resumed."""
    defaults = quick if args.quick else full
    for key in full:
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    tag = f"{study}-quick" if args.quick else study
    args.output = args.output or str(REPO / (f"outputs/{tag}.json" if args.quick else records))
    args.work_dir = args.work_dir or str(REPO / "outputs" / tag)
    return {key: getattr(args, key) for key in result_keys} | {"model": args.model or "smollm2-135m"}
