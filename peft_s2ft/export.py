"""Exact export of an S2FT adapter to PEFT's LoRA format, for servers and tools that only load LoRA.

An S2FT delta is already a low-rank product, so no SVD (and no approximation) is needed:

- a column delta D (out, k) on input columns S is LoRA B = D, A = rows S of the identity (k, in);
- a row delta D (k, in) on output rows R is LoRA A = D, B = columns R of the identity (out, k).

S2FT layers keep deltas and indices in the (out, in) orientation also for transformers' Conv1D (GPT-2), and PEFT's
LoRA stores `lora_A` (r, in) and `lora_B` (out, r) for Conv1D too (only merging transposes, by `fan_in_fan_out`),
so the same factors serve both. Every module gets lora_alpha equal to its rank: the scaling is exactly 1, in PEFT
(alpha / r per module) and in vLLM (one lora_alpha / r for the whole adapter).

The folder is what `LoraModel.save_pretrained` writes (adapter_config.json and the weights, keys
`base_model.model.<module path>.lora_A.weight`), written to a staging folder first and moved into place, so a
failed export leaves the previous folder as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, get_pattern_key
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import S2FTConfig, SelectionFileConfig
from .experts import S2FTExpertsLayer
from .layer import S2FTLayer
from .partial_backprop import COLUMNS
from .saving import remove_leftovers

# The ranks vLLM accepts for --max-lora-rank (vllm/config/lora.py); an adapter's r must not exceed it.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
KEY_PREFIX = "base_model.model."
_STAGING = ".s2ft-lora-export-"


@dataclass(frozen=True)
class LoraFactors:
    """One module's exact LoRA pair: delta = lora_B @ lora_A, in the (out, in) orientation."""

    path: str
    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    conv1d: bool

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def padded(self, rank: int) -> LoraFactors:
        """The same delta at a higher rank: zero rows of A and zero columns of B add nothing."""
        extra = rank - self.rank
        lora_A = torch.cat([self.lora_A, self.lora_A.new_zeros(extra, self.lora_A.shape[1])], dim=0)
        lora_B = torch.cat([self.lora_B, self.lora_B.new_zeros(self.lora_B.shape[0], extra)], dim=1)
        return LoraFactors(self.path, lora_A, lora_B, self.conv1d)


def export_lora(
    peft_model: nn.Module,
    output_dir: str | os.PathLike[str],
    adapter_name: str = "default",
    pad_to_rank: int | str | None = None,
    safe_serialization: bool = True,
) -> LoraConfig:
    """Write the S2FT adapter `adapter_name` as a standard PEFT LoRA adapter folder that reproduces it exactly.

    Args:
        peft_model: a PeftModel holding the S2FT adapter (also an S2FTModel tuner, or a transformers model with the
            adapter injected through `load_adapter`). Merged adapters and permute mode export the same adapter.
        output_dir: the folder to write; an existing LoRA export there is replaced, other files are kept.
        adapter_name: the S2FT adapter to export; only the layers that hold it are written.
        pad_to_rank: None keeps each module's own rank (its number of selected columns or rows; `rank_pattern`).
            An int >= the largest of them, or "vllm" (the smallest rank vLLM accepts that holds them), gives every
            module that one rank by zero padding, with no `rank_pattern`.
        safe_serialization: write adapter_model.safetensors (True) or adapter_model.bin (False).

    Returns:
        The LoraConfig that was written.

    Raises:
        ValueError: unknown or non-S2FT adapter, a pad_to_rank that cannot hold the adapter, "vllm" with
            modules_to_save (vLLM refuses them), or an output folder holding another method's adapter.
        TypeError: the adapter trains fused experts, which have no nn.Linear LoRA equivalent.
    """
    model, config = _resolve(peft_model, adapter_name)
    if pad_to_rank == "vllm" and config.modules_to_save:
        raise ValueError(
            f"pad_to_rank='vllm': adapter '{adapter_name}' fully trains modules_to_save "
            f"({', '.join(sorted(config.modules_to_save))}), and vLLM refuses LoRA adapters with modules_to_save. "
            "Export without pad_to_rank='vllm' to load it with PEFT, or train an adapter without modules_to_save."
        )
    factors = list(_adapter_factors(model, adapter_name))
    if not factors:
        raise ValueError(f"Adapter '{adapter_name}' is on no S2FT layer of this model: there is nothing to export.")
    rank = _target_rank(pad_to_rank, max(f.rank for f in factors))
    if rank is not None:
        factors = [f.padded(rank) for f in factors]
    lora_config = _lora_config(config, factors, rank)
    _check_peft_resolves(lora_config, model, factors)
    state_dict = _lora_state_dict(factors) | _modules_to_save_state_dict(model, adapter_name)
    _write_folder(os.fspath(output_dir), lora_config, state_dict, safe_serialization)
    return lora_config


# --------------------------------------------------------------------------------------------------
# what to export
def _resolve(peft_model: nn.Module, adapter_name: str) -> tuple[nn.Module, S2FTConfig]:
    """The transformers model (whose module paths are the LoRA file's keys) and the adapter's S2FT config."""
    tuner = peft_model.base_model if isinstance(peft_model, PeftModel) else peft_model
    if isinstance(tuner, BaseTuner):
        model = tuner.model
    elif isinstance(getattr(peft_model, "peft_config", None), dict):
        model = peft_model  # a transformers model with injected adapters
    else:
        raise TypeError(
            f"export_lora expects a PeftModel holding an S2FT adapter, got {type(peft_model).__qualname__}."
        )
    configs = getattr(tuner, "peft_config", None) or {}
    config = configs.get(adapter_name)
    if not isinstance(config, SelectionFileConfig):  # S2FT's or PaCA's: column and row deltas alike
        own = sorted(name for name, c in configs.items() if isinstance(c, SelectionFileConfig))
        what = "no adapter" if config is None else f"a {config.peft_type} adapter, not an S2FT or PaCA one,"
        raise ValueError(
            f"The model has {what} named '{adapter_name}'. Its S2FT and PaCA adapters: {', '.join(own) or 'none'}; "
            "pass one of them as adapter_name."
        )
    return model, config


def _adapter_factors(model: nn.Module, adapter_name: str) -> Iterator[LoraFactors]:
    for path, module in model.named_modules():
        if isinstance(module, S2FTExpertsLayer) and adapter_name in module.s2ft_delta:
            raise TypeError(
                f"Adapter '{adapter_name}' trains the fused experts '{path}': a per-expert delta has no nn.Linear LoRA "
                "equivalent, so it cannot be exported as LoRA. Leave the experts out of the adapter (target_modules "
                "without them) to export the rest."
            )
        if isinstance(module, S2FTLayer) and adapter_name in module.s2ft_delta:
            yield _layer_factors(path, module, adapter_name)


def _layer_factors(path: str, layer: S2FTLayer, adapter_name: str) -> LoraFactors:
    """The exact pair of one layer. Deltas and indices are in the original coordinates also in permute mode and
    while merged, so the pair applies to a fresh copy of the base model."""
    delta = layer.s2ft_delta[adapter_name].detach()
    if delta.is_meta:
        raise ValueError(
            f"The delta of adapter '{adapter_name}' in '{path}' is on the meta device (no values): load or "
            "materialize the adapter before exporting it."
        )
    delta = delta.cpu().clone()
    indices = layer.selected(adapter_name)
    k = len(indices)
    positions = torch.arange(k)
    if layer.axis == COLUMNS:
        lora_A = delta.new_zeros(k, layer.in_features)
        lora_A[positions, indices] = 1
        lora_B = delta
    else:
        lora_A = delta
        lora_B = delta.new_zeros(layer.out_features, k)
        lora_B[indices, positions] = 1
    return LoraFactors(path, lora_A, lora_B, isinstance(layer.get_base_layer(), Conv1D))


def _target_rank(pad_to_rank: int | str | None, largest: int) -> int | None:
    """The one rank every module is padded to, or None to keep each module's own."""
    if pad_to_rank is None:
        return None
    if pad_to_rank == "vllm":
        fitting = [r for r in VLLM_RANKS if r >= largest]
        if not fitting:
            raise ValueError(
                f"pad_to_rank='vllm': the adapter has a module of rank {largest} (selected columns or rows), above "
                f"vLLM's largest LoRA rank {VLLM_RANKS[-1]}. Train fewer heads/channels per layer for vLLM."
            )
        return fitting[0]
    if isinstance(pad_to_rank, bool) or not isinstance(pad_to_rank, int):
        raise ValueError(f"pad_to_rank must be None, an int or 'vllm', got {pad_to_rank!r}.")
    if pad_to_rank < largest:
        raise ValueError(
            f"pad_to_rank={pad_to_rank} is below the adapter's largest module rank {largest} (its selected columns or "
            f"rows): an exact LoRA needs at least that. Pass pad_to_rank >= {largest}, or None for per-module ranks."
        )
    return pad_to_rank


# --------------------------------------------------------------------------------------------------
# the LoRA config, checked against PEFT's own matching
def _lora_config(config: S2FTConfig, factors: list[LoraFactors], rank: int | None) -> LoraConfig:
    r = rank if rank is not None else max(f.rank for f in factors)
    pattern = {f.path: f.rank for f in factors if f.rank != r}
    return LoraConfig(
        r=r,
        lora_alpha=r,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules={f.path for f in factors},
        lora_dropout=0.0,
        bias="none",
        use_dora=False,
        # LoRA on Conv1D runs with fan_in_fan_out=True (PEFT forces it, with a warning, when it is False).
        fan_in_fan_out=any(f.conv1d for f in factors),
        modules_to_save=list(config.modules_to_save) if config.modules_to_save else None,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )


def _base_module_paths(module: nn.Module, prefix: str = "") -> Iterator[str]:
    """The module paths of the base model as a fresh copy has them (without tuner and wrapper internals)."""
    if prefix:
        yield prefix
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    elif isinstance(module, AuxiliaryTrainingWrapper):
        module = module.original_module
    for name, child in module.named_children():
        yield from _base_module_paths(child, f"{prefix}.{name}" if prefix else name)


def _check_peft_resolves(lora_config: LoraConfig, model: nn.Module, factors: list[LoraFactors]) -> None:
    """PEFT must wrap exactly the exported modules, each at its own rank with alpha = rank."""
    expected = {f.path: f.rank for f in factors}
    matched = {
        path
        for path in _base_module_paths(model)
        if (found := check_target_module_exists(lora_config, path)) is True or isinstance(found, re.Match)
    }
    if matched != set(expected):
        raise RuntimeError(
            f"PEFT's LoRA matching of the exported target_modules would wrap {sorted(matched ^ set(expected))[:5]} "
            "wrongly (module paths that end in another's path, or modules_to_save names inside trained paths). "
            "Please report this; the folder was not written."
        )
    for path, rank in expected.items():
        r = lora_config.rank_pattern.get(get_pattern_key(lora_config.rank_pattern.keys(), path), lora_config.r)
        alpha_key = get_pattern_key(lora_config.alpha_pattern.keys(), path)
        alpha = lora_config.alpha_pattern.get(alpha_key, lora_config.lora_alpha)
        if r != rank or alpha != rank:
            raise RuntimeError(
                f"PEFT would give '{path}' rank {r} and alpha {alpha} instead of {rank} (its rank_pattern keys match "
                "other modules). Pass pad_to_rank to export one rank without rank_pattern; the folder was not written."
            )


# --------------------------------------------------------------------------------------------------
# tensors and files
def _lora_state_dict(factors: list[LoraFactors]) -> dict[str, torch.Tensor]:
    state_dict = {}
    for f in factors:
        state_dict[f"{KEY_PREFIX}{f.path}.lora_A.weight"] = f.lora_A.contiguous()
        state_dict[f"{KEY_PREFIX}{f.path}.lora_B.weight"] = f.lora_B.contiguous()
    return state_dict


def _modules_to_save_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's copies of its modules_to_save, keyed as PEFT saves them (no wrapper or adapter name)."""
    state_dict = {}
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            if adapter_name in module.modules_to_save:
                for key, tensor in module.modules_to_save[adapter_name].state_dict().items():
                    state_dict[f"{KEY_PREFIX}{path}.{key}"] = tensor.detach().cpu().clone().contiguous()
        elif isinstance(module, AuxiliaryTrainingWrapper) and adapter_name in getattr(module, "_adapters", ()):
            raise TypeError(
                f"Adapter '{adapter_name}' has a {type(module).__name__} on '{path}', which export_lora cannot write."
            )
    return state_dict


def _refuse_other_adapter(output_dir: str) -> None:
    """Never overwrite another method's adapter (e.g. the S2FT adapter itself) with the LoRA export."""
    path = os.path.join(output_dir, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as file:
            peft_type = json.load(file).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return
    if peft_type not in (None, "LORA"):
        raise ValueError(
            f"'{output_dir}' holds an adapter of another method (peft_type {peft_type} in its {CONFIG_NAME}), which "
            "export_lora would overwrite with the LoRA export. Choose another output_dir."
        )


def _write_staged(staging: str, lora_config: LoraConfig, state_dict: dict, safe_serialization: bool) -> str:
    """Write config and weights into `staging` and flush them to disk; returns the weights file's name."""
    lora_config.save_pretrained(staging)
    name = SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
    target = os.path.join(staging, name)
    if safe_serialization:
        save_file(state_dict, target, metadata={"format": "pt"})
    else:
        torch.save(state_dict, target)
    for written in (CONFIG_NAME, name):
        with open(os.path.join(staging, written), "rb") as file:
            os.fsync(file.fileno())
    return name


def _write_folder(output_dir: str, lora_config: LoraConfig, state_dict: dict, safe_serialization: bool) -> None:
    """Stage everything, then move it into place: a failure before the move leaves `output_dir` untouched.

    A new folder appears whole (one rename). In an existing one, the weights and then the config are renamed over
    the old files; a weights file of the other format (which PEFT would load instead) is moved out first.
    """
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir '{output_dir}' exists and is not a folder.")
    exists = os.path.isdir(output_dir)
    if exists:
        _refuse_other_adapter(output_dir)
        stage_in, prefix = output_dir, _STAGING
    else:
        stage_in, prefix = os.path.dirname(output_dir), f".{os.path.basename(output_dir)}{_STAGING}"
        os.makedirs(stage_in, exist_ok=True)
    remove_leftovers(os.path.join(stage_in, f"{prefix}*"))
    staging = tempfile.mkdtemp(prefix=prefix, dir=stage_in)
    try:
        name = _write_staged(staging, lora_config, state_dict, safe_serialization)
        if not exists:
            os.rename(staging, output_dir)
            return
        _move_into(staging, output_dir, name, WEIGHTS_NAME if safe_serialization else SAFETENSORS_WEIGHTS_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into(staging: str, output_dir: str, weights: str, other_weights: str) -> None:
    stale, parked = os.path.join(output_dir, other_weights), os.path.join(staging, f"stale-{other_weights}")
    if os.path.lexists(stale):
        os.replace(stale, parked)
    try:
        os.replace(os.path.join(staging, weights), os.path.join(output_dir, weights))
    except BaseException:
        if os.path.lexists(parked):
            os.replace(parked, stale)
        raise
    os.replace(os.path.join(staging, CONFIG_NAME), os.path.join(output_dir, CONFIG_NAME))


__all__ = ["VLLM_RANKS", "LoraFactors", "export_lora"]
