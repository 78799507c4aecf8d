"""S2FTModel: PEFT's BaseTuner glue that plans the selection and wires S2FT layers in."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
from torch import nn

from . import checkpoint, permutation
from .config import S2FTConfig
from .layer import S2FTLayer
from .partial_backprop import COLUMNS, ROWS
from .peft_type import PREFIX
from .selection import select_units
from .structures import COLUMN_TRAINED, ROW_TRAINED, ModelStructure, discover_structure

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TRAINABLE_NAMES = COLUMN_TRAINED + ROW_TRAINED
AXIS_OF = {**dict.fromkeys(COLUMN_TRAINED, COLUMNS), **dict.fromkeys(ROW_TRAINED, ROWS)}


def default_target_modules(config: S2FTConfig) -> set[str]:
    """The module kinds an adapter may train, given which budgets can be non-zero."""
    attention_off = config.heads_per_layer == 0 or (
        config.heads_per_layer is None and config.head_ratio is None and config.attention_share == 0
    )
    ffn_off = config.channels_per_layer == 0 or (
        config.channels_per_layer is None and config.channel_ratio is None and config.attention_share == 1
    )
    names = set()
    if not attention_off:
        names |= {"o_proj"} | ({"v_proj"} if config.train_v else set())
    if not ffn_off:
        names |= {"down_proj"} | ({"up_proj"} if config.train_up else set())
    return names


def selection_plan(config: S2FTConfig, model: nn.Module) -> dict[str, torch.Tensor]:
    """Module path -> trained indices (original coordinates) for every module the adapter trains."""
    structure = discover_structure(model)
    targets = config.target_modules
    wanted = {n for n in TRAINABLE_NAMES if isinstance(targets, str) or n in targets}
    attention = [
        b for b in structure.attention if "o_proj" in wanted and check_target_module_exists(config, b.module("o_proj"))
    ]
    ffn = [
        b for b in structure.ffn if "down_proj" in wanted and check_target_module_exists(config, b.module("down_proj"))
    ]
    weights = {
        key: permutation.base_linear(model.get_submodule(key)).weight
        for key in [b.module("o_proj") for b in attention] + [b.module("down_proj") for b in ffn]
    }
    selection = select_units(config, model, attention, ffn, weights)

    plan: dict[str, torch.Tensor] = {}
    for block in attention:
        heads = selection.heads.get(block.prefix)
        if not heads:
            continue
        plan[block.module("o_proj")] = _head_columns(heads, block.head_dim)
        if config.train_v and "v_proj" in wanted:
            groups = sorted({h // block.group_size for h in heads})
            plan[block.module("v_proj")] = _head_columns(groups, block.head_dim)
    for block in ffn:
        channels = selection.channels.get(block.prefix)
        if not channels:
            continue
        plan[block.module("down_proj")] = torch.tensor(channels, dtype=torch.long)
        if config.train_up and "up_proj" in wanted:
            plan[block.module("up_proj")] = torch.tensor(channels, dtype=torch.long)
    return plan


def _head_columns(heads: list[int], head_dim: int) -> torch.Tensor:
    return (torch.tensor(heads)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def attach(
    parent: nn.Module, child_name: str, adapter_name: str, indices: torch.Tensor, init_weights: bool
) -> S2FTLayer:
    """Wrap the linear `parent.<child_name>` (or add an adapter to its S2FT layer) training `indices`."""
    target = getattr(parent, child_name)
    axis = AXIS_OF[child_name]
    if isinstance(target, S2FTLayer):
        target.update_layer(adapter_name, indices, init_weights)
        return target
    layer = S2FTLayer(target, adapter_name, axis, indices, init_weights)
    setattr(parent, child_name, layer)
    return layer


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

    def _prepare_adapter_config(self, peft_config: S2FTConfig, model_config: dict) -> S2FTConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = default_target_modules(peft_config)
        elif not isinstance(peft_config.target_modules, str):
            unknown = set(peft_config.target_modules) - set(TRAINABLE_NAMES)
            if unknown:
                raise ValueError(
                    f"S2FTConfig.target_modules contains {sorted(unknown)}: S2FT trains only {TRAINABLE_NAMES} "
                    "(set the budget fields and train_v / train_up instead)."
                )
        return peft_config

    def _check_new_adapter_config(self, config: S2FTConfig) -> None:
        super()._check_new_adapter_config(config)
        if len(self.peft_config) > 1 and any(c.permute for c in self.peft_config.values()):
            raise ValueError(
                "S2FTConfig.permute=True physically reorders the weights for one selection, so it supports a single "
                "adapter per model. Use permute=False (the default) to combine several adapters."
            )
        checkpoint.refuse_module_like_adapter_names(self.peft_config)

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict | None = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        self._prepare_adapter_config(config, self.get_model_config(model))
        # Plan (and validate) everything before the first module is touched.
        self._pending_plan = selection_plan(config, model)
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        finally:
            del self._pending_plan
        if config.permute:
            permutation.permute_model(model, adapter_name)

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
        indices = self._pending_plan.get(current_key)
        if indices is None:
            # A global allocation can leave a layer without units; nothing to train here.
            return
        layer = attach(parent, target_name, adapter_name, indices, peft_config.init_weights)
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)

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
        if self.peft_config.get(adapter_name) is not None and self.peft_config[adapter_name].permute:
            permutation.unpermute_model(self.model)
        super().delete_adapter(adapter_name)

    # ----------------------------------------------------------------------------------------------
    # checkpoints: the file holds indices (original coordinates) and deltas; loading follows the file
    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: S2FTConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        state_dict = checkpoint.conform_model_to_checkpoint(model, config, adapter_name, state_dict)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


__all__ = ["S2FTModel", "ModelStructure", "attach", "selection_plan"]
