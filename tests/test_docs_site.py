"""The documentation site (mkdocs.yml, docs/): it builds offline with `mkdocs build --strict` and no warning, every
page is in the nav, the API reference covers `peft_s2ft.__all__`, nothing is loaded from the network, and the
Python snippets say only what the code does: every snippet compiles and names existing API and config fields, and
the snippets of the pages in EXECUTED run on a tiny random Llama."""

from __future__ import annotations

import ast
import dataclasses
import html
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peft_s2ft

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
# Pages whose ```python blocks run, in order and in one namespace per page, with `model_path` (a tiny random Llama
# with a chat tokenizer) and `batches` (calibration batches for it) bound. A page says so in its text.
EXECUTED = (
    "concepts/selection.md",
    "concepts/partial-backprop.md",
    "concepts/co-permutation.md",
    "concepts/adapter-format.md",
    "guides/trainer.md",
    "guides/trl.md",
    "guides/several-adapters.md",
    "guides/serving.md",
    "guides/architectures.md",
)
SAYS_IT_RUNS = re.compile(r"snippets? (of|on) this page runs?|snippet runs in the test suite", re.I)
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.M | re.S)
needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed (the docs extra: pip install -c .ci/constraints.txt -e '.[docs]')",
)


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def _snippets(page: Path) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block of a page."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in FENCE.finditer(text)]


def _nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    return [page for item in nav for page in _nav_pages(item)]


# --------------------------------------------------------------------------------------------------
# the build
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, str]:
    site_dir = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # mkdocs-material's banner about MkDocs 2.0
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return site_dir, output


@needs_mkdocs
def test_the_site_builds_strict_without_a_warning(site):
    _, output = site
    problems = [line for line in output.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
    assert not problems, "\n".join(problems)


@needs_mkdocs
def test_every_page_is_in_the_nav_and_built(site):
    import yaml

    site_dir, _ = site
    nav = _nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    assert len(nav) == len(set(nav)), "a page is listed twice in the nav"
    on_disk = {str(page.relative_to(DOCS)) for page in _pages()}
    assert set(nav) == on_disk, f"not in the nav: {on_disk - set(nav)}; in the nav but missing: {set(nav) - on_disk}"
    for page in nav:
        built = site_dir / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert built.is_file(), page


@needs_mkdocs
def test_the_api_reference_covers_the_public_api_and_the_field_help_texts(site):
    site_dir, _ = site
    page = (site_dir / "api" / "index.html").read_text()
    for name in peft_s2ft.__all__:
        assert f'id="peft_s2ft.{name}"' in page, name
    text = html.unescape(re.sub(r"<[^>]+>", "", page))
    for config in (peft_s2ft.S2FTConfig, peft_s2ft.PaCAConfig):
        for field in dataclasses.fields(config):
            help_text = field.metadata.get("help")
            if help_text and field.name in config.__annotations__:  # the config's own fields, not PeftConfig's
                assert help_text.split("`")[0][:60] in text, f"{config.__name__}.{field.name}"


@needs_mkdocs
def test_the_site_loads_nothing_from_the_network(site):
    site_dir, _ = site
    remote = re.compile(r"<(?:link|script|img|iframe|source)\b[^>]*\b(?:href|src)=\"(?:https?:)?//", re.I)
    for page in site_dir.rglob("*.html"):
        text = page.read_text()
        assert not remote.search(text), f"{page.relative_to(site_dir)} loads {remote.search(text).group(0)}"
        assert "fonts.googleapis" not in text and "fonts.gstatic" not in text, page


# --------------------------------------------------------------------------------------------------
# the snippets
def _check_names(tree: ast.AST, where: str) -> None:
    """`peft_s2ft.X`, `from peft_s2ft... import X` and the keyword arguments of S2FTConfig / PaCAConfig exist."""
    configs = {"S2FTConfig": peft_s2ft.S2FTConfig, "PaCAConfig": peft_s2ft.PaCAConfig}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "peft_s2ft":
            assert hasattr(peft_s2ft, node.attr), f"{where}: peft_s2ft.{node.attr} does not exist"
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "peft_s2ft":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{where}: {node.module}.{alias.name} does not exist"
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            if name in configs:
                fields = {f.name for f in dataclasses.fields(configs[name])}
                for keyword in node.keywords:
                    assert keyword.arg in fields, f"{where}: {name} has no field {keyword.arg!r}"


def test_every_snippet_compiles_and_names_existing_api():
    count = 0
    for page in _pages():
        for line, code in _snippets(page):
            where = f"{page.relative_to(ROOT)}:{line}"
            _check_names(compile(code, where, "exec", ast.PyCF_ONLY_AST), where)
            count += 1
    assert count >= 20  # the pages have snippets to check


def test_the_pages_that_say_their_snippets_run_are_the_ones_that_run():
    saying = {str(page.relative_to(DOCS)) for page in _pages() if SAYS_IT_RUNS.search(page.read_text())}
    assert saying == set(EXECUTED)
    assert all(_snippets(DOCS / page) for page in EXECUTED)


def _readme_block(heading_pattern: str) -> str:
    return re.search(heading_pattern + r".*?```python\n(.*?)```", README.read_text(), re.S).group(1)


def test_the_quickstart_page_shows_the_readme_snippets_that_the_readme_tests_run():
    quickstart = [code for _, code in _snippets(DOCS / "quickstart.md")]
    assert quickstart[0] == _readme_block(r"## Quickstart\s+")  # run by tests/test_readme.py
    assert quickstart[1] == _readme_block(r"The data-driven selections of the paper")  # tests/test_calibration.py


def test_the_architectures_page_lists_exactly_the_supported_model_types():
    text = (DOCS / "guides" / "architectures.md").read_text()
    paragraph = re.search(r"The `model_type` values described.*?\n\n(.*?)\n\n", text, re.S).group(1)
    assert tuple(re.findall(r"`([a-z0-9_]+)`", paragraph)) == peft_s2ft.SUPPORTED_MODEL_TYPES


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from tiny_chat import save_tiny_llama

    return str(save_tiny_llama(tmp_path_factory.mktemp("docs-llama")))


@pytest.mark.parametrize("page", EXECUTED)
def test_the_snippets_of_the_page_run(page, tiny_model, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = ["The sky is blue.", "2 + 3 = 5", "Hello there, how are you?", "Paris is in France."]
    batches = [dict(tokenizer(texts[i : i + 2], return_tensors="pt", padding=True)) for i in (0, 2)]
    compile_for_real = torch.compile
    # The inductor backend would take minutes on a CPU; the eager backend traces the same graph.
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: compile_for_real(model, backend="eager"))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"model_path": tiny_model, "batches": batches}
    for line, code in _snippets(DOCS / page):
        exec(compile(code, f"docs/{page}:{line}", "exec"), namespace)
