"""S2FTModel: PEFT's BaseTuner glue that plans the selection and wires S2FT layers in."""

from __future__ import annotations

import contextlib
import re

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn

from . import checkpoint, permutation
from .config import S2FTConfig
from .layer import S2FTLayer, attach
from .partial_backprop import COLUMNS, ROWS
from .peft_type import PREFIX
from .selection import select_units
from .structures import COLUMN_TRAINED, ROW_TRAINED, ModelStructure, base_layer_of, discover_structure

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TRAINABLE_NAMES = COLUMN_TRAINED + ROW_TRAINED
ATTENTION_TRAINED, FFN_TRAINED = ("o_proj", "v_proj"), ("down_proj", "up_proj")
FLAG_OF = {"v_proj": "train_v", "up_proj": "train_up"}

# module path -> (axis, indices in original coordinates)
Plan = dict[str, tuple[str, torch.Tensor]]


def trained_kinds(config: S2FTConfig, structure: ModelStructure) -> set[str]:
    """Which of o/v/down/up_proj the adapter trains; refuses targets that would train nothing or ignore a field."""
    targets = config.target_modules
    if targets == INCLUDE_LINEAR_LAYERS_SHORTHAND:
        raise ValueError(
            f"S2FTConfig.target_modules='{INCLUDE_LINEAR_LAYERS_SHORTHAND}' has no meaning for S2FT: it trains whole "
            "heads (output-projection columns) and FFN channels (down-projection columns), plus value / up rows with "
            "train_v / train_up. Leave target_modules unset, or list some of "
            f"{', '.join(TRAINABLE_NAMES)}."
        )
    if isinstance(targets, str):  # a regex over module paths, matched as PEFT matches it
        named = {
            name
            for block in (*structure.attention, *structure.ffn)
            for name in TRAINABLE_NAMES
            if name in block.member_names and re.fullmatch(targets, block.module(name))
        }
    else:
        named = set(targets)
        unknown = named - set(TRAINABLE_NAMES)
        if unknown:
            raise ValueError(
                f"S2FTConfig.target_modules contains {sorted(unknown)}: S2FT trains only {TRAINABLE_NAMES} "
                "(set the budget fields and train_v / train_up instead)."
            )
    shown = repr(targets) if isinstance(targets, str) else sorted(targets)
    for name, flag in FLAG_OF.items():
        if name in named and not getattr(config, flag):
            raise ValueError(
                f"S2FTConfig.target_modules={shown} names '{name}' but {flag}=False: set {flag}=True to train the "
                f"{name.split('_')[0]} rows of the selected units."
            )
        if getattr(config, flag) and name not in named:
            raise ValueError(
                f"S2FTConfig.{flag}=True, but target_modules={shown} does not name '{name}': add it, or leave "
                "target_modules unset."
            )
    for part, names, off, budget_set, fields in (
        ("heads", ATTENTION_TRAINED, config.attention_off, config.sets_attention_budget, "heads_per_layer/head_ratio"),
        ("channels", FFN_TRAINED, config.ffn_off, config.sets_ffn_budget, "channels_per_layer/channel_ratio"),
    ):
        if named & set(names) and off:
            raise ValueError(
                f"S2FTConfig.target_modules={shown} names {sorted(named & set(names))}, but the budget selects no "
                f"{part} ({fields} = 0, or attention_share at its limit). Change the budget or the targets."
            )
        if not named & set(names) and budget_set:
            raise ValueError(
                f"S2FTConfig sets {fields} but target_modules={shown} names none of {list(names)}: nothing would "
                f"use those {part}. Add the module or drop the field."
            )
    if not named:
        raise ValueError(
            f"S2FTConfig.target_modules={shown} names no module S2FT trains ({', '.join(TRAINABLE_NAMES)})."
        )
    return named


def selection_plan(config: S2FTConfig, model: nn.Module, structure: ModelStructure | None = None) -> Plan:
    """Every module the adapter trains, with its axis and indices (original coordinates)."""
    structure = structure or discover_structure(model)
    kinds = trained_kinds(config, structure)

    def wanted(block, names) -> list[str]:
        return [n for n in names if n in kinds and check_target_module_exists(config, block.module(n))]

    attention = [b for b in structure.attention if wanted(b, ATTENTION_TRAINED)]
    ffn = [b for b in structure.ffn if wanted(b, FFN_TRAINED)]
    weights = {
        key: base_layer_of(model.get_submodule(key)).weight
        for key in [b.module("o_proj") for b in attention] + [b.module("down_proj") for b in ffn]
    }
    if config.selection != "random" and any(w.is_meta for w in weights.values()):
        raise ValueError(
            f"S2FTConfig.selection='{config.selection}' scores the model's weights, but they are on the meta device "
            "(the model was built under init_empty_weights). Load the real weights before get_peft_model, or use "
            "selection='random'."
        )
    selection = select_units(config, model, attention, ffn, weights)

    plan: Plan = {}
    for block in attention:
        heads = selection.heads.get(block.prefix)
        if not heads:
            continue
        names = wanted(block, ATTENTION_TRAINED)
        if "o_proj" in names:
            plan[block.module("o_proj")] = (COLUMNS, _head_columns(heads, block.head_dim))
        if "v_proj" in names:
            groups = sorted({h // block.group_size for h in heads})
            plan[block.module("v_proj")] = (ROWS, _head_columns(groups, block.head_dim))
    for block in ffn:
        channels = selection.channels.get(block.prefix)
        if not channels:
            continue
        for name in wanted(block, FFN_TRAINED):
            plan[block.module(name)] = (COLUMNS if name == "down_proj" else ROWS, torch.tensor(channels))
    if not plan:
        raise ValueError(
            "S2FT found nothing to train with this config: no output/down/value/up projection is left by "
            f"target_modules={config.target_modules!r}, layers_to_transform={config.layers_to_transform!r} and "
            f"exclude_modules={config.exclude_modules!r}. Check those fields."
        )
    return plan


def _head_columns(heads: list[int], head_dim: int) -> torch.Tensor:
    return (torch.tensor(heads)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def refuse_foreign_layers(model: nn.Module, structure: ModelStructure, plan: Plan, permute: bool) -> None:
    """S2FT does not stack on another PEFT method's layers: say so before anything is wrapped."""
    paths = set(plan)
    if permute:  # co-permutation also reorders the modules that feed the trained ones
        for block in (*structure.attention, *structure.ffn):
            members = {block.module(name) for name in block.member_names}
            if members & set(plan):
                paths |= members
    for path in sorted(paths):
        module = model.get_submodule(path)
        if isinstance(module, BaseTunerLayer) and not isinstance(module, S2FTLayer):
            kind = f"{type(module).__module__}.{type(module).__qualname__}"
            raise ValueError(
                f"S2FT cannot adapt '{path}': it is already a layer of another PEFT method ({kind}). S2FT does not "
                "stack on other adapters' layers; merge that adapter into the base first (merge_and_unload) or put "
                "S2FT on a fresh base model."
            )


class S2FTModel(BaseTuner):
    """Creates an S2FT model from a transformers Llama-family model.

    Example:
        ```py
        >>> import peft_s2ft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_s2ft.S2FTConfig(task_type="CAUSAL_LM"))
        ```
    """

    prefix: str = PREFIX
    tuner_layer_cls = S2FTLayer
    target_module_mapping = {model_type: ["o_proj", "down_proj"] for model_type in SUPPORTED_MODEL_TYPES}

    def __init__(self, model, peft_config, adapter_name, low_cpu_mem_usage=False, state_dict=None) -> None:
        # A single config (not a dict) means `inject_adapter_in_model`, which transformers' `load_adapter` uses
        # before loading the file its own way; see checkpoint.LoadAdapterBridge.
        self._injected_directly = isinstance(peft_config, PeftConfig)
        shared = getattr(model, "peft_config", None)  # a model that already holds adapters shares its dict
        known = set(shared) if isinstance(shared, dict) else set()
        try:
            super().__init__(
                model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict
            )
        except BaseException:
            if isinstance(shared, dict) and adapter_name not in known:
                shared.pop(adapter_name, None)  # a refused adapter must not stay registered on the model
            raise

    def _prepare_adapter_config(self, peft_config: S2FTConfig, model_config: dict) -> S2FTConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = peft_config.default_target_modules()
        return peft_config

    def _check_new_adapter_config(self, config: S2FTConfig) -> None:
        super()._check_new_adapter_config(config)
        # Adapters of other methods can share the dict when injected directly into one model.
        own = [c for c in self.peft_config.values() if isinstance(c, S2FTConfig)]
        if len(own) > 1 and any(c.permute for c in own):
            raise ValueError(
                "S2FTConfig.permute=True physically reorders the weights for one selection, so it supports a single "
                "adapter per model. Use permute=False (the default) to combine several adapters."
            )
        checkpoint.refuse_module_like_adapter_names(self.peft_config)

    def _plan(self, model: nn.Module, config: S2FTConfig) -> Plan:
        """The file's selection when the config came from an adapter folder, else a fresh selection."""
        structure = discover_structure(model)
        if config.permute:
            permutation.check_permutable(model)
        source = getattr(config, "_adapter_source", None)
        if source is not None and source.fingerprint != config.selection_fingerprint():
            source = None  # edited since it was read: the user asks for another selection
        state_dict = source.read() if source is not None else None
        if state_dict is not None:
            plan = checkpoint.check_checkpoint(model, state_dict)
        else:
            plan = selection_plan(config, model, structure)
        refuse_foreign_layers(model, structure, plan, config.permute)
        if config.permute:
            permutation.check_contiguous(model, plan)
        return plan

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict | None = None,
    ) -> None:
        """Plan and check everything first; if wrapping or permuting fails anyway, take it all out again."""
        config = self.peft_config[adapter_name]
        self._prepare_adapter_config(config, self.get_model_config(model))
        self._pending_plan = self._plan(model, config)
        requires_grad = checkpoint.snapshot_requires_grad(model)
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
            self._attach_unvisited(model, adapter_name, config)
            if config.permute:
                permutation.permute_model(model, adapter_name)
        except BaseException:
            checkpoint.undo_injection(model, adapter_name, requires_grad)
            raise
        finally:
            del self._pending_plan
        if self._injected_directly and hasattr(type(model), "_load_pretrained_model"):
            checkpoint.LoadAdapterBridge(adapter_name, requires_grad).install(model)

    def _attach_unvisited(self, model: nn.Module, adapter_name: str, config: S2FTConfig) -> None:
        """Layers of a file's plan that `target_modules` does not name (the file is the truth)."""
        for path, (axis, indices) in self._pending_plan.items():
            module = model.get_submodule(path)
            if isinstance(module, S2FTLayer) and adapter_name in module.s2ft_delta:
                continue
            parent_path, _, child = path.rpartition(".")
            layer = attach(model.get_submodule(parent_path), child, adapter_name, axis, indices, config.init_weights)
            layer.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _create_and_replace(
        self,
        peft_config: S2FTConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        planned = self._pending_plan.get(current_key)
        if planned is None:
            # A global allocation can leave a layer without units; nothing to train here.
            return
        axis, indices = planned
        layer = attach(parent, target_name, adapter_name, axis, indices, peft_config.init_weights)
        if adapter_name not in self.active_adapters:
            layer.s2ft_delta[adapter_name].requires_grad_(False)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ):
        # Co-permuted weights go back to the original order before PEFT merges and swaps the wrappers out.
        permutation.unpermute_model(self.model)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def delete_adapter(self, adapter_name: str) -> None:
        if getattr(self.peft_config.get(adapter_name), "permute", False):
            permutation.unpermute_model(self.model)
        super().delete_adapter(adapter_name)

    # ----------------------------------------------------------------------------------------------
    # features PEFT routes to the tuner that S2FT does not have yet: a clear error, never a silent fallback
    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "S2FT does not support mixed-adapter batches yet: with `adapter_names=[...]` every row would get the "
                "active adapter. Run one batch per adapter after `set_adapter(name)` instead."
            )
        yield

    def add_weighted_adapter(self, *args, **kwargs):
        raise NotImplementedError(
            "peft_s2ft does not implement add_weighted_adapter yet. To combine S2FT adapters, activate several at "
            "once (`model.base_model.set_adapter([name_a, name_b])` sums their deltas) or merge them together "
            "(`model.merge_adapter([name_a, name_b])`)."
        )

    # ----------------------------------------------------------------------------------------------
    # checkpoints: the file holds indices (original coordinates) and deltas; loading follows the file
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # torch loads module by module: check every layer's adapter tensors before the first one is copied.
        checkpoint.check_layers_before_loading(self.model, state_dict, prefix + "model.")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: S2FTConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        state_dict = checkpoint.conform_model_to_checkpoint(model, config, adapter_name, state_dict)
        # PEFT's key mapping reads model.state_dict(); only keys are needed, so skip un-permuting the base weights.
        with permutation.state_dict_in_stored_order():
            return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


__all__ = ["S2FTModel", "ModelStructure", "attach", "selection_plan"]
