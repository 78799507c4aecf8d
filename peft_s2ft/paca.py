"""PaCA (partial connection adaptation, ICLR 2025) as its own PEFT method, on S2FT's machinery.

PaCA trains `r` random input columns of every targeted linear layer and saves only those columns of the layer's
input for backward. That is S2FT's column delta without the structure: the same layer (`S2FTLayer`, axis "in"),
the same autograd function, merge by copy (undone bit for bit, unlike PaCA's own fork of PEFT, whose merge
overwrites the columns), several adapters, mixed batches and the same checkpoint format (indices in original
coordinates plus deltas). Only the planner differs: no architecture description, any nn.Linear / Conv1D, columns
drawn per layer from a generator seeded by the config's seed and the layer's path, so they do not depend on which
other layers are targeted or in what order they are visited.
"""

from __future__ import annotations

import copy
import zlib
from dataclasses import dataclass, field

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import (
    BaseTunerLayer,
    _ExcludedModule,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn

from . import checkpoint
from .config import SelectionFileConfig
from .layer import S2FTLayer, S2FTTunerLayer
from .linear_like import features, is_linear_like
from .model import Plan, S2FTModel
from .partial_backprop import COLUMNS
from .peft_type import PaCAPeftType

SELECTION_FIELDS = ("r", "seed", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


@dataclass
class PaCAConfig(SelectionFileConfig, PeftConfig):
    """Configuration of a PaCA adapter: `r` random input columns trained in each targeted linear layer."""

    r: int = field(
        default=8,
        metadata={
            "help": "Input columns trained per adapted linear layer; the layer trains out_features x r parameters and "
            "saves only those r input columns for backward."
        },
    )
    target_modules: list[str] | str | None = field(
        default=INCLUDE_LINEAR_LAYERS_SHORTHAND,
        metadata={
            "help": "Module names or a regex of the linear layers to adapt; 'all-linear' (the default, PaCA's choice) "
            "adapts every nn.Linear / Conv1D layer except the output layer."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Indices of the layers to adapt. All of them when unset."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list (e.g. 'layers'), used with `layers_to_transform`."}
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the column draw (with each layer's path). It does not touch torch's global random state."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the adapter starts as a zero delta (the model is unchanged). False: a small random "
            "non-zero delta, for tests that need to see the adapter act."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules apart from the adapter layers that are fully trained and saved (e.g. a classifier)."
        },
    )

    # What S2FT's shared code reads of a config, fixed for PaCA: no co-permutation, no disjoint selections.
    permute = False
    disjoint_from = None
    any_linear_layer = True  # checkpoint.py: a file's layers are any linear layer's columns, not described units

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PaCAPeftType.PACA
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"PaCAConfig.r={self.r!r}: must be a positive integer count of input columns per layer.")
        if self.target_modules is None:
            raise ValueError(
                "PaCAConfig.target_modules=None: name the linear layers to adapt, or use 'all-linear' (the default)."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"PaCAConfig.layers_pattern={self.layers_pattern!r}: only has an effect together with "
                "layers_to_transform."
            )

    def selection_fingerprint(self) -> tuple:
        values = [getattr(self, name) for name in SELECTION_FIELDS]
        return tuple(tuple(sorted(v)) if isinstance(v, (set, list)) else v for v in values)


def random_columns(config: PaCAConfig, path: str, layer: nn.Module) -> torch.Tensor:
    """`config.r` distinct input columns of `layer`, sorted, from a generator seeded by the seed and the path."""
    in_features = features(layer)[1]
    if config.r > in_features:
        raise ValueError(
            f"PaCAConfig.r={config.r}, but '{path}' has only {in_features} input columns: lower r, or leave that "
            "layer out (exclude_modules)."
        )
    generator = torch.Generator().manual_seed(zlib.crc32(f"{config.seed}:{path}".encode()))
    return torch.randperm(in_features, generator=generator)[: config.r].sort().values


def _in_chosen_layers(config: PaCAConfig, names: set[str]) -> set[str]:
    """The expanded 'all-linear' names that `layers_to_transform` / `layers_pattern` keep.

    PEFT applies layer indexing only to target names matched as suffixes; a full module path in target_modules is
    taken as chosen directly, so after the expansion to full paths `layers_to_transform` would be silently ignored.
    Each name is checked here as its last segment, which PEFT's own matching then indexes.
    """
    if config.layers_to_transform is None:
        return names
    probe = copy.copy(config)
    kept = set()
    for name in names:
        probe.target_modules = {name.rpartition(".")[2]}
        found = check_target_module_exists(probe, name)
        if found and not isinstance(found, _ExcludedModule):
            kept.add(name)
    return kept


class PaCAModel(S2FTModel):
    """Creates a PaCA model from any model with linear layers.

    Example:
        ```py
        >>> import peft_s2ft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_s2ft.PaCAConfig(r=8, task_type="CAUSAL_LM"))
        ```
    """

    def _prepare_adapter_config(self, peft_config: PaCAConfig, model_config: dict) -> PaCAConfig:
        targets = peft_config.target_modules
        if isinstance(targets, str) and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
            # PEFT's expansion skips layers another adapter of this model already wraps (their class names do not
            # say "Linear"); a second PaCA adapter adapts them too.
            wrapped = {name for name, module in self.model.named_modules() if isinstance(module, S2FTLayer)}
            peft_config = _maybe_include_all_linear_layers(peft_config, self.model)
            peft_config.target_modules = _in_chosen_layers(peft_config, set(peft_config.target_modules) | wrapped)
        return peft_config

    def _checkpoint_path_segments(self) -> set[str]:
        """Any module of the model can hold a PaCA layer: every path segment, but not other adapters' internals (a
        LoRA's `lora_A.default`)."""
        wrapped = tuple(f"{name}." for name, m in self.model.named_modules() if isinstance(m, BaseTunerLayer))
        return {
            segment
            for name, _ in self.model.named_modules()
            if not name.startswith(wrapped)
            for segment in name.split(".")
        }

    def _plan(self, model: nn.Module, config: PaCAConfig) -> Plan:
        """The file's columns when the config came from an adapter folder; else filled in as layers are visited."""
        state_dict = self._file_state_dict(config)
        self._fresh_plan = state_dict is None
        return {} if state_dict is None else checkpoint.check_column_checkpoint(model, state_dict)

    def _create_and_replace(
        self,
        peft_config: PaCAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        if isinstance(target, BaseTunerLayer) and not isinstance(target, S2FTTunerLayer):
            kind = f"{type(target).__module__}.{type(target).__qualname__}"
            raise ValueError(
                f"PaCA cannot adapt '{current_key}': it is already a layer of another PEFT method ({kind}). Merge that "
                "adapter into the base first (merge_and_unload) or put PaCA on a fresh base model."
            )
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not is_linear_like(base):
            raise ValueError(
                f"PaCA adapts linear layers (nn.Linear, transformers Conv1D); target_modules matched '{current_key}', "
                f"a {type(base).__name__}. Name only linear layers, or use 'all-linear'."
            )
        if self._fresh_plan:
            self._pending_plan[current_key] = (COLUMNS, random_columns(peft_config, current_key, base))
        super()._create_and_replace(peft_config, adapter_name, target, target_name, parent, current_key, **kwargs)

    def add_weighted_adapter(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "add_weighted_adapter fuses S2FT adapters; PaCA adapters cannot be fused yet. Merge them one by one "
            "(merge_adapter) to combine their effects in the base weights."
        )


__all__ = ["PaCAConfig", "PaCAModel", "random_columns"]
