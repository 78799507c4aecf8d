"""Point PEFT's generic model suites at S2FT: the config lists become S2FTConfig (in the decoder suite, also
PaCAConfig), nothing else changes.

Per file (`SUITES`): the named top-level config lists are replaced by S2FTConfig with the file's task type
and the per-model default targets (`target_modules: None`, what PEFT's lists give every tuner); the model
lists are PEFT's own, minus the ids in `DROP` and plus the ids in `EXTEND` (each with its reason). The test
bodies and PeftCommonTester's checks run unchanged. Assignments are located with `ast`, so a PEFT release
that reorders a file still adapts cleanly, and one that renames a list, or drops an id `DROP` names, stops
the run instead of testing less. Every model id left in an adapted list must be one build_models.py builds;
given an HF_HOME, this script then builds them (in the same process, which saves an import of transformers).

test_target_parameters.py is LoRA's `target_parameters` feature (adapting an nn.Parameter, e.g. the 3-d
expert tensors of an MoE layer, rather than a module). Its ALL_CONFIGS are (model id, LoraConfig, kwargs)
triples with `target_parameters`, which S2FTConfig has no equivalent of; what the file can give S2FT is its
TestDecoderModelsTargetParameters class, a copy of the generic decoder tests, run here on its two MoE
models (tiny Llama4, GPT-OSS) with one S2FTConfig each. Three of that class's tests assert LoRA-only errors
(ParamWrapper's mixed-batch and weighted-adapter refusals) and are deselected by run.sh; the file's other
tests (TestTargetParameters, test_rank_pattern_for_moe_target_parameters) test LoRA and ignore ALL_CONFIGS,
and run as PEFT wrote them, like the other methods' tests in test_decoder_models.py.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from build_models import MODELS, build


def s2ft(task_type: str, paca: bool = False) -> str:
    """The config list: S2FT with its per-model default targets; with `paca`, also PaCA on every linear layer."""
    configs = [f'(S2FTConfig, {{"task_type": "{task_type}", "target_modules": None}})']
    if paca:
        configs.append(f'(PaCAConfig, {{"task_type": "{task_type}", "r": 2}})')
    return "[" + ", ".join(configs) + "]"


# Issue #9 §3 asks for these task-head suites on BERT and RoBERTa.
NOT_REQUESTED = "DeBERTa: not among the encoders issue #9 asks for (BERT, RoBERTa)"
SUITES = {
    "test_decoder_models.py": {
        "replace": {"ALL_CONFIGS": s2ft("CAUSAL_LM", paca=True)},  # PaCA: issue #11 asks for the decoder suite
        "model_lists": ["PEFT_DECODER_MODELS_TO_TEST", "SMALL_GRID_MODELS"],
    },
    "test_seq_classifier.py": {
        "replace": {"ALL_CONFIGS": s2ft("SEQ_CLS")},
        "model_lists": ["PEFT_SEQ_CLS_MODELS_TO_TEST"],
    },
    "test_token_classification_qa.py": {
        "replace": {"TOKEN_CLS_CONFIGS": s2ft("TOKEN_CLS"), "QA_CONFIGS": s2ft("QUESTION_ANS")},
        "model_lists": ["PEFT_TOKEN_CLS_MODELS_TO_TEST"],  # PEFT_QA_MODELS_TO_TEST is this same list
    },
    "test_feature_extraction_models.py": {
        "replace": {"ALL_CONFIGS": s2ft("FEATURE_EXTRACTION")},
        "model_lists": ["PEFT_FEATURE_EXTRACTION_MODELS_TO_TEST"],
    },
    "test_target_parameters.py": {
        "replace": {"ALL_CONFIGS": None},  # one S2FT triple per model id of the file's triples, see moe_configs
        "model_lists": [],
    },
}
# test_decoder_models.py parametrizes its generic tests over PEFT_DECODER_MODELS_TO_TEST only (OPT, GPT-2,
# GPT-J, Llama, Qwen2, Gemma3); its other models appear only in tests of other methods (SMALL_GRID_MODELS
# feeds a prompt-learning test alone; Qwen3 a prefix-tuning test). Appended, the generic tests run on all nine,
# Mistral and Qwen3 (which S2FT supports) included. Each must occur in the file, and not be listed already.
EXTEND = {
    "test_decoder_models.py": {
        "PEFT_DECODER_MODELS_TO_TEST": [
            "hf-internal-testing/tiny-random-gpt2",
            "hf-internal-testing/tiny-random-MistralForCausalLM",
            "trl-internal-testing/tiny-Qwen3ForCausalLM",
        ],
    },
}
DROP = {
    "test_seq_classifier.py": {
        # S2FT supports Llama, but the issue restricts this suite to BERT and RoBERTa. build_models.py builds
        # the id all the same: deleting this entry is all it takes to test it.
        "trl-internal-testing/tiny-LlamaForSequenceClassification-3.2": "Llama: the suite is BERT/RoBERTa only",
    },
    "test_feature_extraction_models.py": {
        "peft-internal-testing/tiny-random-DebertaModel": NOT_REQUESTED,
        "peft-internal-testing/tiny-random-DebertaV2Model": NOT_REQUESTED,
    },
}
MARKER = "# adapted for S2FT by peft-s2ft's scripts/peft_suite/adapt_tests.py\n"


def moe_configs(node: ast.Assign) -> tuple[str, list[str]]:
    """ALL_CONFIGS of test_target_parameters.py: (model id, S2FTConfig, kwargs) for each of its model ids."""
    model_ids = []
    for element in node.value.elts:
        first = element.elts[0]
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            raise SystemExit("test_target_parameters.py: an ALL_CONFIGS entry does not start with a model id.")
        if first.value not in model_ids:
            model_ids.append(first.value)
    kwargs = '{"task_type": "CAUSAL_LM", "target_modules": None}'
    return "[" + ", ".join(f"({model_id!r}, S2FTConfig, {kwargs})" for model_id in model_ids) + "]", model_ids


def adapt(name: str, source: str) -> tuple[str, list[str]]:
    """The adapted source and the model ids its adapted lists test."""
    if source.startswith(MARKER):
        raise SystemExit(f"{name} is already adapted: adapt a fresh copy of PEFT's tests.")
    table, drop, extend = SUITES[name], DROP.get(name, {}), EXTEND.get(name, {})
    wanted = set(table["replace"]) | set(table["model_lists"])
    lines = source.splitlines(keepends=True)
    spans, tested = {}, []
    for node in ast.parse(source).body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if not (isinstance(target, ast.Name) and target.id in wanted):
            continue
        if target.id in table["model_lists"]:
            models = ast.literal_eval(node.value)
            missing = set(drop) - set(models)
            if missing:
                raise SystemExit(f"{name}: {target.id} no longer lists {', '.join(sorted(missing))}: PEFT changed it.")
            added = extend.get(target.id, [])
            stray = [model_id for model_id in added if model_id in models or f'"{model_id}"' not in source]
            if stray:
                raise SystemExit(f"{name}: {', '.join(stray)} already in {target.id} or not in the file: PEFT changed")
            kept = [model_id for model_id in models if model_id not in drop] + added
            tested += kept
            text = repr(kept)
        elif table["replace"][target.id] is None:
            text, model_ids = moe_configs(node)
            tested += model_ids
        else:
            text = table["replace"][target.id]
        spans[target.id] = (node.lineno - 1, node.end_lineno, text)
    missing = wanted - set(spans)
    if missing:
        raise SystemExit(f"{name} has no top-level {', '.join(sorted(missing))}: PEFT changed it.")
    for list_name, (start, stop, text) in sorted(spans.items(), key=lambda item: -item[1][0]):
        lines[start:stop] = [f"{list_name} = {text}\n"]
    header = (
        MARKER + "import peft_s2ft  # registers the S2FT and PaCA types\nfrom peft_s2ft import PaCAConfig, S2FTConfig\n"
    )
    return header + "".join(lines), tested


def main(tests: Path) -> None:
    unbuilt = set()
    for name in SUITES:
        path = tests / name
        if not path.is_file():
            raise SystemExit(f"PEFT's tests have no {name}: PEFT renamed or removed it; update SUITES.")
        source, tested = adapt(name, path.read_text())
        path.write_text(source)
        unbuilt |= set(tested) - set(MODELS)
    if unbuilt:
        raise SystemExit(f"PEFT's model lists name ids build_models.py does not build: {', '.join(sorted(unbuilt))}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: adapt_tests.py PATH/TO/PEFT/tests [HF_HOME]  (with HF_HOME, also build the models there)")
    main(Path(sys.argv[1]))
    if len(sys.argv) == 3:
        build(Path(sys.argv[2]))  # in this process: one import of torch and transformers fewer
