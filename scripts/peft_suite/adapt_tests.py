"""Point PEFT's tests/test_decoder_models.py at S2FT: only S2FTConfig, only the model families S2FT supports.

Everything else in the file (the test bodies, PeftCommonTester's checks) runs unchanged. The three list
assignments are located with `ast`, so a PEFT patch release that reorders the file still adapts cleanly.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MODELS = [
    "trl-internal-testing/tiny-random-LlamaForCausalLM",
    "hf-internal-testing/tiny-random-MistralForCausalLM",
    "peft-internal-testing/tiny-dummy-qwen2",
    "trl-internal-testing/tiny-Qwen3ForCausalLM",
]
REPLACEMENTS = {
    "PEFT_DECODER_MODELS_TO_TEST": repr(MODELS),
    "SMALL_GRID_MODELS": repr(MODELS),
    # What PEFT's list gives every tuner: the task type and the per-model default targets.
    "ALL_CONFIGS": '[(S2FTConfig, {"task_type": "CAUSAL_LM", "target_modules": None})]',
}
MARKER = "# adapted for S2FT by peft-s2ft's scripts/peft_suite/adapt_tests.py\n"


def adapt(source: str) -> str:
    if source.startswith(MARKER):
        return source
    lines = source.splitlines(keepends=True)
    spans = {}
    for node in ast.parse(source).body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(target, ast.Name) and target.id in REPLACEMENTS:
            spans[target.id] = (node.lineno - 1, node.end_lineno)
    missing = set(REPLACEMENTS) - set(spans)
    if missing:
        raise SystemExit(f"test_decoder_models.py has no top-level {', '.join(sorted(missing))}: PEFT changed it.")
    for name, (start, stop) in sorted(spans.items(), key=lambda item: -item[1][0]):
        lines[start:stop] = [f"{name} = {REPLACEMENTS[name]}\n"]
    header = MARKER + "import peft_s2ft  # registers the S2FT type with PEFT\nfrom peft_s2ft import S2FTConfig\n"
    return header + "".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: adapt_tests.py PATH/TO/test_decoder_models.py")
    path = Path(sys.argv[1])
    path.write_text(adapt(path.read_text()))
