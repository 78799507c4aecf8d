"""Runs a script of examples/ in its reduced form, as a user would, and returns what it printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, out: Path, *args: str) -> str:
    """stdout of `python examples/<name> --max-steps 1 --output-dir <out> <args>`; fails with its stderr's end."""
    command = [sys.executable, str(EXAMPLES / name), "--max-steps", "1", "--output-dir", str(out), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    return done.stdout
