"""PEFT's four merge tests on the Llama and Gemma3 models, which PEFT's own file skips for every tuner.

peft 0.21's `check_beft_config` tests `isinstance(config_cls, BeftConfig)` on a class, which is always
False, so test_merge_layers, _multi, _nan and _fp16 are skipped on any model id containing "llama" or "gemma3".
These are the same test bodies without that skip, on the ids of PEFT_DECODER_MODELS_TO_TEST it skips. Copied
next to PEFT's tests by run.sh.
"""

import pytest
from transformers import AutoModelForCausalLM

from . import test_decoder_models as decoder_tests
from .testing_common import PeftCommonTester
from .testing_utils import set_init_weights_false

SKIPPED_BY_PEFT = [
    model_id
    for model_id in decoder_tests.PEFT_DECODER_MODELS_TO_TEST
    if "llama" in model_id.lower() or "gemma3" in model_id.lower()
]


@pytest.mark.parametrize("model_id", SKIPPED_BY_PEFT)
@pytest.mark.parametrize("config_cls,config_kwargs", decoder_tests.ALL_CONFIGS)
class TestLlamaMerge(PeftCommonTester):
    transformers_class = AutoModelForCausalLM
    prepare_inputs_for_testing = decoder_tests.TestDecoderModels.prepare_inputs_for_testing

    def test_merge_layers(self, model_id, config_cls, config_kwargs):
        self._test_merge_layers(model_id, config_cls, set_init_weights_false(config_cls, config_kwargs).copy())

    def test_merge_layers_multi(self, model_id, config_cls, config_kwargs):
        self._test_merge_layers_multi(model_id, config_cls, set_init_weights_false(config_cls, config_kwargs).copy())

    def test_merge_layers_nan(self, model_id, config_cls, config_kwargs):
        self._test_merge_layers_nan(model_id, config_cls, set_init_weights_false(config_cls, config_kwargs).copy())

    def test_merge_layers_fp16(self, model_id, config_cls, config_kwargs):
        self._test_merge_layers_fp16(model_id, config_cls, config_kwargs.copy())
