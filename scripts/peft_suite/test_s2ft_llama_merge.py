"""PEFT's four merge tests on the Llama model, which PEFT's own file skips for every tuner.

peft 0.21's `check_beft_config` tests `isinstance(config_cls, BeftConfig)` on a class, which is always
False, so test_merge_layers, _multi, _nan and _fp16 are skipped on any model id containing "llama". These are
the same test bodies without that skip. Copied next to PEFT's tests by run.sh.
"""

import pytest
from transformers import AutoModelForCausalLM

from . import test_decoder_models as decoder_tests
from .testing_common import PeftCommonTester
from .testing_utils import set_init_weights_false

LLAMA = "trl-internal-testing/tiny-random-LlamaForCausalLM"


@pytest.mark.parametrize("config_cls,config_kwargs", decoder_tests.ALL_CONFIGS)
class TestLlamaMerge(PeftCommonTester):
    transformers_class = AutoModelForCausalLM
    prepare_inputs_for_testing = decoder_tests.TestDecoderModels.prepare_inputs_for_testing

    def test_merge_layers(self, config_cls, config_kwargs):
        self._test_merge_layers(LLAMA, config_cls, set_init_weights_false(config_cls, config_kwargs).copy())

    def test_merge_layers_multi(self, config_cls, config_kwargs):
        self._test_merge_layers_multi(LLAMA, config_cls, set_init_weights_false(config_cls, config_kwargs).copy())

    def test_merge_layers_nan(self, config_cls, config_kwargs):
        self._test_merge_layers_nan(LLAMA, config_cls, set_init_weights_false(config_cls, config_kwargs).copy())

    def test_merge_layers_fp16(self, config_cls, config_kwargs):
        self._test_merge_layers_fp16(LLAMA, config_cls, config_kwargs.copy())
