"""Registering S2FT with PEFT's four type mappings, idempotently and without clobbering others."""

from __future__ import annotations

from peft import mapping

from . import saving
from .config import S2FTConfig
from .model import S2FTModel
from .peft_type import PREFIX, S2FTPeftType


def register() -> None:
    """Make PEFT (and transformers' adapter integration) know the S2FT type.

    Importing twice is harmless; an "S2FT" entry owned by someone else (say a future upstream S2FT) is
    left alone and reported, rather than silently replaced. Also wraps PEFT's save path (saving.py).
    """
    key = S2FTPeftType.S2FT
    existing = mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(key)
    if existing is not S2FTConfig or mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(key) is not S2FTModel:
        if existing is not None or key in mapping.PEFT_TYPE_TO_TUNER_MAPPING:
            owner = getattr(existing, "__module__", "unknown")
            raise RuntimeError(
                f"A PEFT method named 'S2FT' is already registered (config class from '{owner}'). peft_s2ft will not "
                "overwrite it; uninstall one of the two or import only one S2FT implementation."
            )
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] = S2FTConfig
        mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] = S2FTModel
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] = PREFIX
    saving.install()
