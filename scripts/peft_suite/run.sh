#!/usr/bin/env bash
# PEFT's own generic decoder-model suite (its tests/test_decoder_models.py, from the sdist of the installed peft)
# run offline against S2FTConfig on tiny random Llama, Mistral, Qwen2 and Qwen3 models.
#
#   bash scripts/peft_suite/run.sh [pytest args]
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

PEFT_VERSION=$("$PYTHON" -c "import peft; print(peft.__version__)")
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
if [ ! -f "$SUITE/tests/test_decoder_models.py" ]; then
  echo "The peft $PEFT_VERSION sdist has no tests/test_decoder_models.py: nothing to run." >&2
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

# PEFT's tests folder, adapted to S2FT, with this harness's offline conftest, pytest settings and extra test.
rm -rf "$SUITE/run" && mkdir -p "$SUITE/run"
cp -r "$SUITE/tests" "$SUITE/run/tests"
touch "$SUITE/run/tests/__init__.py"  # the sdist has none; the tests import each other relatively
"$PYTHON" "$HERE/adapt_tests.py" "$SUITE/run/tests/test_decoder_models.py"
cp "$HERE/test_s2ft_llama_merge.py" "$SUITE/run/tests/"
cp "$HERE/conftest.py" "$HERE/pytest.ini" "$SUITE/run/"

export HF_HOME="$WORK/hf_home" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH="$PYDEPS:$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" "$HERE/build_models.py" "$HF_HOME"

# Tests of other PEFT methods (they ignore ALL_CONFIGS) whose models or data cannot be had offline:
# OPT and Gemma checkpoints, and the english_quotes dataset with a real tokenizer.
DESELECT=(
  test_prompt_tuning_text_tokenizer_kwargs
  test_prompt_tuning_trust_remote_code
  test_generate_adalora_no_dropout
  test_prompt_tuning_prepare_inputs_for_generation_4d_attention_mask
  test_lora_embed_scale_is_applied  # also matches ..._mixed_batch
  test_prefix_tuning_gemma4_works
  test_prefix_tuning_gemma4_warns_if_some_layers_skipped
  test_prefix_tuning_gemma4_raises_if_all_layers_skipped
  test_prefix_tuning_mistral
  test_prompt_learning_with_gradient_checkpointing
)
ARGS=()
for name in "${DESELECT[@]}"; do
  ARGS+=(--deselect "tests/test_decoder_models.py::TestDecoderModels::$name")
done
cd "$SUITE/run"
echo "peft $PEFT_VERSION's decoder suite against peft_s2ft from $("$PYTHON" -c 'import peft_s2ft; print(peft_s2ft.__file__)')"
"$PYTHON" -m pytest tests/test_decoder_models.py tests/test_s2ft_llama_merge.py -p no:cacheprovider -q -rfEs \
  "${ARGS[@]}" "$@"
