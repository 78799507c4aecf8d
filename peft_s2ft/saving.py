"""Saving an adapter: a crash mid-write never replaces a good adapter, and no base weight is copied.

`PeftModel.save_pretrained` writes the weights file straight into its final path, so an exception or a kill
mid-write leaves a truncated file where the previous adapter was; and it reads the whole model state dict to pick
the adapter's tensors out of it, which in permute mode would un-permute (copy) every permuted base weight first.
PEFT has no hook for either, so `install()` wraps the two names its save path calls, in `peft.peft_model` only:

- `safe_save_file`: for S2FT tensors, write to a temporary file in the same folder, then rename it into place
  (atomic on POSIX and Windows); any other adapter's tensors are written exactly as before.
- `get_peft_model_state_dict`: permuted weights appear as stored (no copy) while it runs; it keeps only
  adapter tensors, which do not depend on the presentation. Models without permuted weights are unaffected.

The config file is written the same way by `S2FTConfig.save_pretrained`.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Callable

from .peft_type import PREFIX
from .permutation import state_dict_in_stored_order

_WRAPPED = "__peft_s2ft_wrapped__"


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call `write(temporary_path)` beside `path`, flush it to disk, then rename it over `path`.

    The writer creates the temporary file itself, so it gets the permissions a plain write would give it.
    """
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _atomic_safe_save_file(save_file: Callable) -> Callable:
    @functools.wraps(save_file)
    def save(tensors, filename, metadata=None):
        if not any(f".{PREFIX}" in key for key in tensors):
            return save_file(tensors, filename, metadata=metadata)
        atomic_write(filename, lambda temporary: save_file(tensors, temporary, metadata=metadata))

    setattr(save, _WRAPPED, True)
    return save


def _state_dict_without_base_copies(get_state_dict: Callable) -> Callable:
    @functools.wraps(get_state_dict)
    def get(*args, **kwargs):
        with state_dict_in_stored_order():
            return get_state_dict(*args, **kwargs)

    setattr(get, _WRAPPED, True)
    return get


def install() -> None:
    """Wrap PEFT's save path once (importing peft_s2ft again is harmless)."""
    from peft import peft_model

    for name, wrap in (
        ("safe_save_file", _atomic_safe_save_file),
        ("get_peft_model_state_dict", _state_dict_without_base_copies),
    ):
        current = getattr(peft_model, name)
        if not getattr(current, _WRAPPED, False):
            setattr(peft_model, name, wrap(current))
