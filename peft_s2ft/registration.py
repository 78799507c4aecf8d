"""Registering S2FT and PaCA with PEFT's type mappings, idempotently and without clobbering others."""

from __future__ import annotations

from peft import mapping

from . import saving
from .config import S2FTConfig
from .model import S2FTModel
from .paca import PaCAConfig, PaCAModel
from .peft_type import PREFIX, PaCAPeftType, S2FTPeftType

METHODS = ((S2FTPeftType.S2FT, S2FTConfig, S2FTModel), (PaCAPeftType.PACA, PaCAConfig, PaCAModel))


def register() -> None:
    """Make PEFT (and transformers' adapter integration) know the S2FT and PaCA types.

    Importing twice is harmless; an entry of the same name owned by someone else (say a future upstream S2FT) is
    left alone and reported, rather than silently replaced. Also wraps PEFT's save path (saving.py).
    """
    for key, config_class, tuner_class in METHODS:
        existing = mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(key)
        if existing is config_class and mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(key) is tuner_class:
            continue
        if existing is not None or key in mapping.PEFT_TYPE_TO_TUNER_MAPPING:
            owner = getattr(existing, "__module__", "unknown")
            raise RuntimeError(
                f"A PEFT method named '{key.value}' is already registered (config class from '{owner}'). peft_s2ft "
                f"will not overwrite it; uninstall one of the two or import only one {key.value} implementation."
            )
    for key, config_class, tuner_class in METHODS:
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] = config_class
        mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] = tuner_class
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] = PREFIX
    saving.install()
