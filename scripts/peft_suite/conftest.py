"""Harness only: offline hub access, PEFT_SUITE_SCOPE, and a per-suite, per-model summary.

PEFT's `hub_online_once` contacts the hub on the first access of a model id and stays offline after that.
Here there is no hub (the models come from build_models.py's cache), and the online branch makes
huggingface_hub retry each request with back-off before it falls back to the cache. Counting every id as
already seen makes every access behave like the second one in PEFT's own CI.

PEFT_SUITE_SCOPE (comma-separated; empty or `all`: everything) keeps the tests of the named suites (SUITES'
keys) on the named model families (build_models.FAMILIES: llama = Llama, Mistral, Qwen2, Qwen3; gpt2 = both
GPT-2 ids; moe = Llama4, GPT-OSS; opt, gptj, gemma3, bert, roberta); no suite named means all suites, no
family all models. With a family, only tests parametrized over the files' model lists run (the tests of
other methods on fixed models are left out).

At the end a table counts, per suite and model id, the selected tests and their outcomes, and the failures
are grouped by reason: S2FT's UnsupportedModelError (anywhere in the exception's chain) is one reason; any
other reason is a finding to look at.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict

import pytest
import tests.testing_utils as peft_testing_utils
from build_models import FAMILIES, ids_of


class _AlwaysSeen(dict):
    def __contains__(self, key: object) -> bool:
        return True

    def __missing__(self, key: object) -> int:
        return 0


peft_testing_utils._HUB_MODEL_ACCESSES = _AlwaysSeen()

# suite -> the files it runs (test_s2ft_llama_merge.py: this harness's addition to the decoder suite)
SUITES = {
    "decoder": ("test_decoder_models.py", "test_s2ft_llama_merge.py"),
    "seq_cls": ("test_seq_classifier.py",),
    "token_cls": ("test_token_classification_qa.py",),
    "feature_extraction": ("test_feature_extraction_models.py",),
    "target_parameters": ("test_target_parameters.py",),
}
UNSUPPORTED = "UnsupportedModelError (S2FT does not support this model yet)"
_outcomes: dict[str, str] = {}
_reasons: dict[str, str] = {}
_labels: dict[str, tuple[str, str]] = {}


def _scope() -> tuple[set[str], set[str]]:
    tokens = {token.strip() for token in os.environ.get("PEFT_SUITE_SCOPE", "").split(",") if token.strip()}
    unknown = tokens - set(SUITES) - set(FAMILIES) - {"all"}
    if unknown:
        raise pytest.UsageError(
            f"PEFT_SUITE_SCOPE: unknown {', '.join(sorted(unknown))}; suites are {', '.join(SUITES)}, "
            f"model families {', '.join(FAMILIES)}"
        )
    return tokens & set(SUITES), tokens & set(FAMILIES)


def _model_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("model_id") if callspec is not None else None


def _suite_of(item: pytest.Item) -> str:
    suite = next((name for name, files in SUITES.items() if item.path.name in files), item.path.name)
    if suite == "token_cls" and item.cls is not None and "QuestionAnswering" in item.cls.__name__:
        return "qa"
    return suite


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    suites, families = _scope()
    files = {name for suite in suites for name in SUITES[suite]}
    models = ids_of(families)
    keep, drop = [], []
    for item in items:
        selected = (not files or item.path.name in files) and (not models or _model_of(item) in models)
        (keep if selected else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:
        _labels[item.nodeid] = (_suite_of(item), _model_of(item) or "- (fixed models, other methods)")


def _reason(exc: BaseException) -> str:
    seen = exc
    while seen is not None:
        if any(cls.__name__ == "UnsupportedModelError" for cls in type(seen).__mro__):
            return UNSUPPORTED
        seen = seen.__cause__ or seen.__context__
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line[:200]}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = (yield).get_result()
    if report.failed and call.excinfo is not None and item.nodeid not in _reasons:
        _reasons[item.nodeid] = _reason(call.excinfo.value)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    rank = {"passed": 0, "skipped": 1, "failed": 2}
    if report.when == "call" or report.outcome != "passed":
        previous = _outcomes.get(report.nodeid, "passed")
        _outcomes[report.nodeid] = max(previous, report.outcome, key=rank.__getitem__)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _labels or config.option.collectonly:
        return
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for nodeid, label in _labels.items():
        counts[label]["collected"] += 1
        if nodeid in _outcomes:
            counts[label][_outcomes[nodeid]] += 1
    write = terminalreporter.write_line
    terminalreporter.section("peft-suite summary: per suite and model id")
    columns = ("collected", "passed", "failed", "skipped")
    width = max(len(model) for _, model in counts)
    write(f"{'suite':<19} {'model id':<{width}} " + " ".join(f"{c:>9}" for c in columns))
    totals: dict[str, Counter] = defaultdict(Counter)
    for (suite, model), counter in sorted(counts.items()):
        totals[suite].update(counter)
        write(f"{suite:<19} {model:<{width}} " + " ".join(f"{counter[c]:>9}" for c in columns))
    for suite, counter in sorted(totals.items()):
        write(f"{suite:<19} {'(all)':<{width}} " + " ".join(f"{counter[c]:>9}" for c in columns))
    reasons: dict[str, Counter] = defaultdict(Counter)
    for nodeid, reason in _reasons.items():
        if nodeid in _labels:
            reasons[reason][_labels[nodeid][1]] += 1
    if reasons:
        terminalreporter.section("peft-suite failures by reason")
        for reason, models in sorted(reasons.items(), key=lambda item: (item[0] != UNSUPPORTED, item[0])):
            write(f"{sum(models.values()):>5}  {reason}")
            for model, count in sorted(models.items()):
                write(f"{count:>11}  {model}")
