"""Saving an adapter: a crash mid-write never replaces a good adapter, and no base weight is copied.

`PeftModel.save_pretrained` and transformers' `save_pretrained` of a model with an injected adapter write the
weights file straight into its final path, so an exception or a kill mid-write leaves a truncated file where the
previous adapter was; and both read the whole model state dict to pick the adapter's tensors out of it, which in
permute mode would un-permute (copy) every permuted base weight first. Neither library has a hook for this, so
`install()` wraps the names their save paths call:

- `safe_save_file` (in `peft.peft_model` and `transformers.modeling_utils`): for S2FT tensors, write to a
  temporary file in the same folder, then rename it into place (atomic on POSIX and Windows); any other
  tensors are written exactly as before.
- `get_peft_model_state_dict` (in `peft.peft_model`, and `peft`'s own, which transformers imports): permuted
  weights appear as stored (no copy) while it runs; it keeps only adapter tensors, which do not depend on the
  presentation. Models without permuted weights are unaffected.

The config file is written the same way by `S2FTConfig.save_pretrained`. Temporary files a killed save left
behind are removed by the next save into the same folder.
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
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
    remove_leftovers(os.path.join(folder, f".{name}.*.tmp"))
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


def remove_leftovers(pattern: str) -> None:
    """Delete what a save that was killed midway left behind (files or folders matching `pattern`)."""
    for leftover in glob.glob(pattern):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            os.remove(leftover)


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
    """Wrap PEFT's and transformers' save paths once (importing peft_s2ft again is harmless)."""
    import peft
    from peft import peft_model
    from transformers import modeling_utils

    for module, name, wrap in (
        (peft_model, "safe_save_file", _atomic_safe_save_file),
        (modeling_utils, "safe_save_file", _atomic_safe_save_file),
        (peft_model, "get_peft_model_state_dict", _state_dict_without_base_copies),
        (peft, "get_peft_model_state_dict", _state_dict_without_base_copies),
    ):
        current = getattr(module, name)
        if not getattr(current, _WRAPPED, False):
            setattr(module, name, wrap(current))
