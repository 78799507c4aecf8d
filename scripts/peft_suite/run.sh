#!/usr/bin/env bash
# PEFT's own generic model suites (from the sdist of the installed peft) run offline against S2FTConfig, on
# every model they test: test_decoder_models.py (OPT, GPT-2, GPT-J, Llama, Mistral, Qwen2, Gemma3, Qwen3),
# test_seq_classifier.py, test_token_classification_qa.py and test_feature_extraction_models.py (BERT and
# RoBERTa), and test_target_parameters.py's generic decoder tests (MoE: tiny Llama4 and GPT-OSS). One pytest
# run; at its end a table per suite and model id, and the failures grouped by reason (conftest.py).
#
#   bash scripts/peft_suite/run.sh [pytest args]               # everything (what CI runs)
#   PEFT_SUITE_SCOPE=llama bash scripts/peft_suite/run.sh      # a subset: suites and/or model families,
#   PEFT_SUITE_SCOPE=decoder,gpt2 bash scripts/peft_suite/run.sh   # comma-separated (conftest.py lists them)
#   bash scripts/peft_suite/run.sh -k merge -x --tb=long       # pytest arguments pass through
#
# Needs pip access to the package index (the peft sdist, and diffusers, which PEFT's test helpers import,
# installed --no-deps into the work folder: nothing in the environment changes). PEFT_SUITE_DIR sets the work
# folder (default: peft-s2ft-peft-suite under $TMPDIR or /tmp); it is reused by later runs.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
WORK="${PEFT_SUITE_DIR:-${TMPDIR:-/tmp}/peft-s2ft-peft-suite}"
PYTHON=${PYTHON:-python}
mkdir -p "$WORK"

# Only two Python processes import torch (adapt_tests.py, pytest): that takes seconds, more on a busy machine.
PEFT_VERSION=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('peft'))")
SUITE="$WORK/peft-$PEFT_VERSION"
if [ ! -f "$SUITE/.complete" ]; then
  rm -rf "$SUITE"
  if ! "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "peft==$PEFT_VERSION" -d "$WORK/dist"; then
    echo "Could not download the sdist of peft $PEFT_VERSION from the package index (needed for PEFT's tests)." >&2
    exit 1
  fi
  tar -xzf "$WORK/dist/peft-$PEFT_VERSION.tar.gz" -C "$WORK"
  touch "$SUITE/.complete"
fi
if [ ! -d "$SUITE/tests" ]; then
  echo "The peft $PEFT_VERSION sdist has no tests folder: nothing to run." >&2
  exit 1
fi
# PEFT's test helpers import diffusers; pinned, and kept in a folder named after the pins so a change reinstalls.
TEST_DEPS=("diffusers==0.42.1" "importlib_metadata==10.2.0" "zipp==4.1.2")
PYDEPS="$WORK/pydeps-$(echo "${TEST_DEPS[*]}" | sha1sum | cut -c1-12)"
if [ ! -f "$PYDEPS/.complete" ]; then
  rm -rf "$PYDEPS"
  "$PYTHON" -m pip install --quiet --no-deps --target "$PYDEPS" "${TEST_DEPS[@]}"
  touch "$PYDEPS/.complete"
fi

# PEFT's tests folder, adapted to S2FT (every suite adapt_tests.py names), with this harness's offline conftest
# (and the model table it reads), pytest settings and extra test.
rm -rf "$SUITE/run" && mkdir -p "$SUITE/run"
cp -r "$SUITE/tests" "$SUITE/run/tests"
touch "$SUITE/run/tests/__init__.py"  # the sdist has none; the tests import each other relatively
cp "$HERE/test_s2ft_llama_merge.py" "$SUITE/run/tests/"
cp "$HERE/conftest.py" "$HERE/build_models.py" "$HERE/pytest.ini" "$SUITE/run/"

export HF_HOME="$WORK/hf_home" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH="$PYDEPS:$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" "$HERE/adapt_tests.py" "$SUITE/run/tests" "$HF_HOME"  # and builds the models (build_models.py)

DESELECT=(
  # Tests of other PEFT methods (they ignore ALL_CONFIGS) whose data cannot be had offline: a Gemma4
  # checkpoint no model list names (the tests depend on its exact KV-sharing layout) ...
  test_decoder_models.py::TestDecoderModels::test_prefix_tuning_gemma4_works
  test_decoder_models.py::TestDecoderModels::test_prefix_tuning_gemma4_warns_if_some_layers_skipped
  test_decoder_models.py::TestDecoderModels::test_prefix_tuning_gemma4_raises_if_all_layers_skipped
  # ... and the english_quotes dataset, tokenized with the model's real tokenizer.
  test_decoder_models.py::TestDecoderModels::test_prefix_tuning_mistral
  test_decoder_models.py::TestDecoderModels::test_prompt_learning_with_gradient_checkpointing
  # Not applicable to S2FT: they assert LoRA's own refusals ("lora.ParamWrapper does not support mixed adapter
  # batches yet", "add_weighted_adapter does not support targeting nn.Parameter"), so they fail for any other
  # method (test_decoder_models.py's versions of these tests skip every method but LoRA, and IA3 for the last).
  test_target_parameters.py::TestDecoderModelsTargetParameters::test_mixed_adapter_batches
  test_target_parameters.py::TestDecoderModelsTargetParameters::test_generate_with_mixed_adapter_batches
  test_target_parameters.py::TestDecoderModelsTargetParameters::test_weighted_combination_of_adapters
  # Not applicable as written: it converts the adapter to LoRA at rank 8 and lowers the rank for OPT only when LoRA's
  # `fc1` is a target; S2FT adapts `fc2`, whose 16x4 weight allows rank 4 at most. (tests/test_architectures.py
  # checks the lossless LoRA export on OPT and every other dense family.)
  "test_decoder_models.py::TestDecoderModels::test_lora_conversion[S2FTConfig-config_kwargs0-peft-internal-testing/tiny-random-OPTForCausalLM]"
  # The same for PaCA, which adapts every linear layer of OPT, its 16x4 fc2 among them (tests/test_paca.py checks
  # PaCA's lossless export_lora).
  "test_decoder_models.py::TestDecoderModels::test_lora_conversion[PaCAConfig-config_kwargs1-peft-internal-testing/tiny-random-OPTForCausalLM]"
)
ARGS=()
for test in "${DESELECT[@]}"; do
  ARGS+=(--deselect "tests/$test")
done
# --tb=line: one line (where it was raised, and what) per failure. Pytest's short and long tracebacks cost 0.5-1 s
# a failure here (hundreds while S2FT refuses most families); pass --tb=long to a -k selection for the whole story.
cd "$SUITE/run"
S2FT_FROM=$("$PYTHON" -c 'import importlib.util as u; print(u.find_spec("peft_s2ft").origin)')
echo "peft $PEFT_VERSION's model suites against peft_s2ft from $S2FT_FROM"
"$PYTHON" -m pytest tests/test_decoder_models.py tests/test_s2ft_llama_merge.py tests/test_seq_classifier.py \
  tests/test_token_classification_qa.py tests/test_feature_extraction_models.py tests/test_target_parameters.py \
  -p no:cacheprovider -q -rfEs --tb=line "${ARGS[@]}" "$@"
