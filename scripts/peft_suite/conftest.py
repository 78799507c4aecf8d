"""Harness only: PEFT's `hub_online_once` always takes its offline branch.

PEFT's helper contacts the hub on the first access of a model id and stays offline after that. Here there
is no hub (the models come from build_models.py's cache), and the online branch makes huggingface_hub retry
each request with back-off before it falls back to the cache. Counting every id as already seen makes every
access behave like the second one in PEFT's own CI.
"""

import tests.testing_utils as peft_testing_utils


class _AlwaysSeen(dict):
    def __contains__(self, key: object) -> bool:
        return True

    def __missing__(self, key: object) -> int:
        return 0


peft_testing_utils._HUB_MODEL_ACCESSES = _AlwaysSeen()
