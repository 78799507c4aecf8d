"""S2FTModel: PEFT's BaseTuner glue that plans the selection and wires S2FT layers in."""

from __future__ import annotations

import contextlib
import dataclasses
import re

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn

from . import checkpoint, fusion, permutation, quantized
from .architectures import (
    DOWN,
    EXPERTS,
    OUTPUT,
    ROLE_FLAGS,
    UP,
    VALUE,
    Block,
    ModelStructure,
    describe,
)
from .architectures.description import KV_GROUP
from .architectures.discovery import base_layer_of
from .calibration import needs_calibration
from .config import S2FTConfig, SelectionFileConfig
from .layer import QuantizedS2FTLayer, S2FTTunerLayer
from .linear_like import readable_weight
from .mixed_batch import BASE, mixed_batch_hooks
from .overlap import units_of
from .partitioned import refuse_partitioned
from .peft_type import PREFIX
from .selection import select_units

# module path -> (axis, indices in original coordinates)
Plan = dict[str, tuple[str, torch.Tensor]]
KIND_OF_ROLE = {OUTPUT: "attention", VALUE: "attention", DOWN: "ffn", UP: "ffn", EXPERTS: "ffn"}


def _relative(span_path: str) -> str:
    """A module's path inside its layer ("self_attn.o_proj"), the name users see in target_modules."""
    parts = span_path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[i + 1 :])
    return span_path


def default_target_modules(config: S2FTConfig, structure: ModelStructure) -> set[str]:
    """The modules of the roles the budgets can use, by their paths inside a layer (PEFT's suffix matching)."""
    roles = config.default_roles()
    return {_relative(path) for path, (_, role) in structure.trainable_paths().items() if role in roles}


def _matches(targets, path: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith(f".{t}") for t in targets)


def trained_roles(config: S2FTConfig, structure: ModelStructure) -> set[str]:
    """Which roles (output / value / down / up) the adapter trains; refuses targets that train nothing or that
    contradict a field. A name that matches modules of two roles (BERT's `output.dense`) names both, but only a
    name that matches one role alone can contradict a budget or flag."""
    targets = config.target_modules
    trainable = structure.trainable_paths()
    names_of_roles = sorted({_relative(path) for path, (block, _) in trainable.items()})
    if targets == INCLUDE_LINEAR_LAYERS_SHORTHAND:
        raise ValueError(
            f"S2FTConfig.target_modules='{INCLUDE_LINEAR_LAYERS_SHORTHAND}' has no meaning for S2FT: it trains whole "
            "heads (output-projection columns) and FFN channels (down-projection columns), plus value / up rows with "
            "train_v / train_up. Leave target_modules unset, or list some of this model's "
            f"{', '.join(names_of_roles)}."
        )
    shown = repr(targets) if targets is None or isinstance(targets, str) else sorted(targets)
    if targets is None:
        named, explicit = config.default_roles(), config.default_roles()
    elif isinstance(targets, str):  # a regex over module paths, matched as PEFT matches it
        named = explicit = {role for path, (_, role) in trainable.items() if _matches(targets, path)}
    else:
        named, explicit = set(), set()
        for target in targets:
            roles = {role for path, (_, role) in trainable.items() if _matches([target], path)}
            if not roles:
                raise ValueError(
                    f"S2FTConfig.target_modules contains '{target}', which is not a module S2FT trains in this model "
                    f"(it trains {', '.join(names_of_roles)}; set the budget fields and train_v / train_up instead)."
                )
            named |= roles
            explicit |= roles if len(roles) == 1 else set()
    for role, flag in ROLE_FLAGS.items():
        modules = ", ".join(sorted({f"'{_relative(p)}'" for p, (_, r) in trainable.items() if r == role}))
        if role in explicit and not getattr(config, flag):
            raise ValueError(
                f"S2FTConfig.target_modules={shown} names {modules} ({role} rows) but {flag}=False: set {flag}=True to "
                f"train the {role} rows of the selected units."
            )
        if getattr(config, flag) and not modules:
            raise ValueError(
                f"S2FTConfig.{flag}=True, but this model has no {role} projection S2FT can train rows of (its "
                f"{'FFNs are fused experts' if role == UP else 'attention has none'}): set {flag}=False."
            )
        if getattr(config, flag) and role not in named:
            raise ValueError(
                f"S2FTConfig.{flag}=True, but target_modules={shown} does not name {modules}: add it, or leave "
                "target_modules unset."
            )
    trained = {r for r in named if r not in ROLE_FLAGS or getattr(config, ROLE_FLAGS[r])}
    for kind, unit, off, budget_set, fields in (
        ("attention", "heads", config.attention_off, config.sets_attention_budget, "heads_per_layer/head_ratio"),
        ("ffn", "channels", config.ffn_off, config.sets_ffn_budget, "channels_per_layer/channel_ratio"),
    ):
        roles = {r for r in trained if KIND_OF_ROLE[r] == kind}
        if roles & explicit and off:
            raise ValueError(
                f"S2FTConfig.target_modules={shown} names the {'/'.join(sorted(roles & explicit))} projection, but the "
                f"budget selects no {unit} ({fields} = 0, or attention_share at its limit). Change the budget or the "
                "targets."
            )
        if not roles and budget_set:
            raise ValueError(
                f"S2FTConfig sets {fields} but target_modules={shown} names no {kind} module S2FT trains: nothing "
                f"would use those {unit}. Add the module or drop the field."
            )
        if off:
            trained -= roles
    if not trained:
        raise ValueError(
            f"S2FTConfig.target_modules={shown} names no module S2FT trains ({', '.join(names_of_roles)})."
        )
    return trained


def selection_plan(config: S2FTConfig, model: nn.Module, structure: ModelStructure | None = None) -> Plan:
    """Every module the adapter trains, with its axis and indices (original coordinates)."""
    structure = structure or describe(model)
    roles = trained_roles(config, structure)

    def wanted(block: Block) -> list[str]:
        return [r for r, span in block.trained.items() if r in roles and check_target_module_exists(config, span.path)]

    attention = [b for b in structure.attention if wanted(b)]
    ffn = [b for b in structure.ffn if wanted(b)]
    experts = [b for b in structure.experts if EXPERTS in roles and check_target_module_exists(config, b.key)]
    if experts and config.train_up:
        raise ValueError(
            f"S2FTConfig.train_up=True trains up-projection rows, which S2FT does not train inside fused experts "
            f"({experts[0].key} and {len(experts) - 1} more): set train_up=False, or leave the experts out of "
            "target_modules to train up rows of the dense FFNs only."
        )
    weights = {b.key: readable_weight(base_layer_of(model.get_submodule(b.key))) for b in attention + ffn}
    weights |= {b.key: base_layer_of(model.get_submodule(b.key)).down_proj for b in experts}
    if config.selection != "random" and any(w.is_meta for w in weights.values()):
        raise ValueError(
            f"S2FTConfig.selection='{config.selection}' scores the model's weights, but they are on the meta device "
            "(the model was built under init_empty_weights). Load the real weights before get_peft_model, or use "
            "selection='random'."
        )
    if config.selection != "random":
        feature = f"S2FTConfig.selection='{config.selection}'"
        refuse_partitioned(weights.values(), feature, ", or use selection='random'")
    # The experts layer checks its tensors' layout on construction; with ZeRO-3 they are empty.
    refuse_partitioned([weights[b.key] for b in experts], "S2FT on fused experts modules")
    taken = units_of(model, config.disjoint_from, structure) if config.disjoint_from else None
    if taken is not None and config.train_v:
        taken = taken.with_whole_kv_groups(structure)
    selection = select_units(config, model, attention, ffn, weights, experts, taken)

    plan: Plan = {}
    for block in attention + ffn:
        units = (selection.heads if block.kind == "attention" else selection.channels).get(block.key)
        if not units:
            continue
        for role in wanted(block):
            span = block.trained[role]
            chosen = sorted({h // block.group_size for h in units}) if span.unit == KV_GROUP else units
            plan[span.path] = (span.axis, span.positions(chosen))
    for block in experts:
        plan[block.key] = (EXPERTS, selection.expert_channels[block.key])
    if not plan:
        raise ValueError(
            "S2FT found nothing to train with this config: no output/down/value/up projection is left by "
            f"target_modules={config.target_modules!r}, layers_to_transform={config.layers_to_transform!r} and "
            f"exclude_modules={config.exclude_modules!r}. Check those fields."
        )
    return plan


def refuse_foreign_layers(model: nn.Module, structure: ModelStructure, plan: Plan, permute: bool) -> None:
    """S2FT does not stack on another PEFT method's layers: say so before anything is wrapped."""
    paths = set(plan)
    if permute:  # co-permutation also reorders the modules that feed the trained ones
        for block in structure.blocks:
            members = {span.path for span in block.moved}
            if members & set(plan):
                paths |= members
    for path in sorted(paths):
        try:
            module = model.get_submodule(path)
        except AttributeError:  # a parameter (attention sinks), not a module
            continue
        if isinstance(module, BaseTunerLayer) and not isinstance(module, S2FTTunerLayer):
            kind = f"{type(module).__module__}.{type(module).__qualname__}"
            raise ValueError(
                f"S2FT cannot adapt '{path}': it is already a layer of another PEFT method ({kind}). S2FT does not "
                "stack on other adapters' layers; merge that adapter into the base first (merge_and_unload) or put "
                "S2FT on a fresh base model."
            )


class S2FTModel(BaseTuner):
    """Creates an S2FT model from a transformers model of a described family (see peft_s2ft.architectures).

    Example:
        ```py
        >>> import peft_s2ft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_s2ft.S2FTConfig(task_type="CAUSAL_LM"))
        ```
    """

    prefix: str = PREFIX
    tuner_layer_cls = S2FTTunerLayer

    def __init__(self, model, peft_config, adapter_name, low_cpu_mem_usage=False, state_dict=None) -> None:
        # A single config (not a dict) means `inject_adapter_in_model`, which transformers' `load_adapter` uses
        # before loading the file its own way; see checkpoint.LoadAdapterBridge.
        self._injected_directly = isinstance(peft_config, PeftConfig)
        shared = getattr(model, "peft_config", None)  # a model that already holds adapters shares its dict
        previous = dict(shared) if isinstance(shared, dict) else None
        try:
            super().__init__(
                model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict
            )
        except BaseException:
            if previous is not None:  # a refused adapter must not stay registered, nor replace another's config
                shared.clear()
                shared.update(previous)
            raise

    def _prepare_adapter_config(self, peft_config: S2FTConfig, model_config: dict) -> S2FTConfig:
        structure = describe(self.model)
        if peft_config.target_modules is None:
            peft_config.target_modules = default_target_modules(peft_config, structure)
        return peft_config

    def _check_new_adapter_config(self, config: S2FTConfig) -> None:
        super()._check_new_adapter_config(config)
        # Adapters of other methods can share the dict when injected directly into one model.
        own = [c for c in self.peft_config.values() if isinstance(c, SelectionFileConfig)]  # S2FT's and PaCA's
        if len(own) > 1 and any(c.permute for c in own):
            raise ValueError(
                "S2FTConfig.permute=True physically reorders the weights for one selection, so it supports a single "
                "adapter per model. Use permute=False (the default) to combine several adapters."
            )
        checkpoint.refuse_module_like_adapter_names(self.peft_config, self._checkpoint_path_segments())
        if BASE in self.peft_config:
            raise ValueError(
                f"'{BASE}' is reserved: in mixed-adapter batches it names the rows that use no adapter. Choose another "
                "adapter name."
            )

    def _checkpoint_path_segments(self) -> set[str]:
        """The segments of the module paths an S2FT checkpoint's keys are made of: the trainable projections'."""
        return {segment for path in describe(self.model).trainable_paths() for segment in path.split(".")}

    @staticmethod
    def _file_state_dict(config) -> dict[str, torch.Tensor] | None:
        """The weights of the folder the config was read from, while its selection fields are as read (a config
        edited since asks for another selection); None for a fresh selection."""
        source = getattr(config, "_adapter_source", None)
        if source is None or source.fingerprint != config.selection_fingerprint():
            return None
        return source.read()

    def _plan(self, model: nn.Module, config: S2FTConfig) -> Plan:
        """The file's selection when the config came from an adapter folder, else a fresh selection."""
        structure = describe(model)
        if config.permute:
            quantized.refuse_permute(model)
            permutation.check_permutable(model)
            feature = "S2FTConfig.permute=True (it reorders weights)"
            refuse_partitioned(model.parameters(), feature, ", or use permute=False")
        if not hasattr(config, "_loaded_geometry"):
            # What the config said before this injection records this model's: the file's base model, for loads.
            config._loaded_geometry = config.base_geometry
        state_dict = self._file_state_dict(config)
        if state_dict is not None:
            checkpoint.check_geometry(config, structure)
            plan = checkpoint.check_checkpoint(model, state_dict)
        elif self._awaits_its_file(model, config):
            # transformers' load_adapter: the file's selection replaces this one before anything runs
            # (LoadAdapterBridge); until then a pre-hook refuses forwards.
            plan = selection_plan(dataclasses.replace(config, selection="random"), model, structure)
            self._selection_from_file = True
        else:
            plan = selection_plan(config, model, structure)
        # Recorded only once the plan stands: a refused load leaves the config as it was.
        config.base_geometry = structure.geometry()
        refuse_foreign_layers(model, structure, plan, config.permute)
        if config.permute and any(axis == EXPERTS for axis, _ in plan.values()):
            raise ValueError(checkpoint.PERMUTE_EXPERTS)
        if config.permute:
            permutation.check_contiguous(model, plan)
        return plan

    def _awaits_its_file(self, model: nn.Module, config: S2FTConfig) -> bool:
        """A config read from a calibrated adapter's folder without its file (transformers' `load_adapter` reads it
        with PeftConfig.from_pretrained): the selection is in the file, which the load bridge reads next."""
        return (
            needs_calibration(config.selection)
            and getattr(config, "_calibration", None) is None
            and config.calibration is not None
            and self._injected_directly
            and hasattr(type(model), "_load_pretrained_model")
        )

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
        checkpoint.stop_awaiting_file(model, adapter_name)  # whatever an earlier adapter of this name waited for
        self._selection_from_file = False
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
        self._record_adapters_on_layers(model)
        if self._injected_directly and hasattr(type(model), "_load_pretrained_model"):
            checkpoint.LoadAdapterBridge(adapter_name, requires_grad).install(model)
        if self._selection_from_file:
            checkpoint.await_file_selection(model, adapter_name, config.selection)

    def _record_adapters_on_layers(self, model: nn.Module) -> None:
        """Every S2FT layer sees the model's adapter configs, so `supports_lora_conversion` (PEFT's convert_to_lora)
        can tell another adapter's name (a zero delta on this layer) from one the model does not have; a layer on a
        quantized weight gets the model's quantization config, with which torchao requantizes merged values."""
        recipe = quantized.recipe_of(model)
        for module in model.modules():
            if isinstance(module, S2FTTunerLayer):
                module._model_peft_config = self.peft_config
            if isinstance(module, QuantizedS2FTLayer):
                module.quantization_recipe = recipe

    def _attach_unvisited(self, model: nn.Module, adapter_name: str, config: S2FTConfig) -> None:
        """Layers of a file's plan that `target_modules` does not name (the file is the truth)."""
        for path, (axis, indices) in self._pending_plan.items():
            module = model.get_submodule(path)
            if isinstance(module, S2FTTunerLayer) and adapter_name in module.s2ft_delta:
                continue
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            layer = checkpoint.attach_planned(parent, child, adapter_name, axis, indices, config.init_weights)
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
        layer = checkpoint.attach_planned(parent, target_name, adapter_name, axis, indices, peft_config.init_weights)
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

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Unloading puts the original module back as it was. (PEFT's default also re-assigns a `weight` taken from
        the wrapper, which fails for wrapped modules that have none, e.g. RoBERTa's classification head.)"""
        setattr(parent, child_name, new_module)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate adapter(s). On a merged model this switches what is merged: the merged adapters' columns are
        restored by copy and the new active adapters are merged in, |S| columns each and bit-exact in any number of
        switches. (PEFT's LoRA unmerges here and leaves the model unmerged, with a warning.)"""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Adapter(s) {', '.join(unknown)} not found; the model has {', '.join(self.peft_config)}.")
        merged = [m for m in self.model.modules() if isinstance(m, S2FTTunerLayer) and m.merged]
        for layer in merged:
            layer.unmerge()
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        if merged:
            self.merge_adapter()

    def delete_adapter(self, adapter_name: str) -> None:
        if getattr(self.peft_config.get(adapter_name), "permute", False):
            permutation.unpermute_model(self.model)
        super().delete_adapter(adapter_name)

    # ----------------------------------------------------------------------------------------------
    # serving
    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """`adapter_names=[...]`: one adapter (or "__base__") per row of the batch; see mixed_batch.py. A training
        forward first refuses 4-bit layers that bitsandbytes repacked for CPU inference (see quantized.py)."""
        if self.model.training and torch.is_grad_enabled():
            quantized.refuse_training_on_cpu_repacked_4bit(self.model)
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        with mixed_batch_hooks(self, adapter_names, args, kwargs):
            yield

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "linear",
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """Fuse S2FT adapters into a new adapter `adapter_name` (PEFT's signature; see fusion.py).

        "linear" is the exact weighted sum of the adapters' deltas on the union of their selections; "ties",
        "dare_linear", "dare_ties" and "magnitude_prune" (with `density`) combine the columns adapters share.
        """
        fusion.add_weighted_adapter(
            self, adapters, weights, adapter_name, combination_type, density, majority_sign_method
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


__all__ = ["S2FTModel", "ModelStructure", "selection_plan"]
