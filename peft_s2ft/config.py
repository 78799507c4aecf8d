"""S2FTConfig: which heads and channels to train, and how many."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Literal, get_args

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME

from .peft_type import S2FTPeftType

SelectionStrategy = Literal[
    "random",
    "weight_large",
    "weight_small",
    "activation_large",
    "activation_small",
    "weight_activation_large",
    "weight_activation_small",
    "gradient_large",
    "gradient_small",
]
SELECTION_STRATEGIES = get_args(SelectionStrategy)
ALLOCATIONS = ("uniform", "global")
# The fields (besides target_modules) that decide which heads and channels an adapter trains.
SELECTION_FIELDS = (
    "trainable_ratio",
    "attention_share",
    "heads_per_layer",
    "head_ratio",
    "channels_per_layer",
    "channel_ratio",
    "selection",
    "calibration",
    "allocation",
    "seed",
    "disjoint_from",
    "train_v",
    "train_up",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
)


class SelectionFileConfig:
    """What S2FT's and PaCA's configs share: a config read from an adapter folder remembers it, so injection follows
    the file's selection, and saving writes the config file atomically.

    Subclasses define `selection_fingerprint()` and list in `_not_saved` the fields that steer a fresh selection only.
    """

    _not_saved: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """PEFT's loader, remembering where the adapter lives so injection can follow its file's selection.

        The link holds only while the selection fields are as read: a config edited into another selection gets a
        fresh selection.
        """
        from .checkpoint import AdapterSource

        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if isinstance(config, SelectionFileConfig):
            download_kwargs, _, _ = cls._split_kwargs(kwargs)
            download_kwargs.pop("subfolder", None)
            config._adapter_source = AdapterSource(
                str(pretrained_model_name_or_path), subfolder, download_kwargs, config.selection_fingerprint()
            )
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """PEFT's writer, into a temporary folder beside the target, then renamed over the old file."""
        from .saving import remove_leftovers

        os.makedirs(save_directory, exist_ok=True)
        remove_leftovers(os.path.join(save_directory, ".s2ft-config-*"))
        staging = tempfile.mkdtemp(prefix=".s2ft-config-", dir=save_directory)
        # Fields that only steered the selection the file now holds; saved, they would send load paths that re-run
        # the selection (transformers' load_adapter) after things that may be gone (S2FT's disjoint_from).
        kept = {name: getattr(self, name) for name in self._not_saved}
        for name in kept:
            setattr(self, name, None)
        try:
            super().save_pretrained(staging, **kwargs)
            os.replace(os.path.join(staging, CONFIG_NAME), os.path.join(save_directory, CONFIG_NAME))
        finally:
            for name, value in kept.items():
                setattr(self, name, value)
            for name in os.listdir(staging):
                os.remove(os.path.join(staging, name))
            os.rmdir(staging)


@dataclass
class S2FTConfig(SelectionFileConfig, PeftConfig):
    """Configuration of an S2FT adapter.

    The default is the paper's recipe: random heads and channels, about 1% of the model's parameters
    trainable, half on attention (output-projection columns of whole heads) and half on the FFN
    (down-projection columns of channels), the same number in every adapted layer.
    """

    _not_saved = ("disjoint_from",)

    trainable_ratio: float = field(
        default=0.01,
        metadata={
            "help": "Fraction of the model's parameters to train, used for every module kind whose count or "
            "ratio below is left unset. Split between attention and FFN by `attention_share`."
        },
    )
    attention_share: float = field(
        default=0.5,
        metadata={"help": "Share of `trainable_ratio` spent on attention heads; the rest goes to FFN channels."},
    )
    heads_per_layer: int | None = field(
        default=None,
        metadata={
            "help": "Number of attention heads trained per adapted layer (uniform allocation) or in total "
            "(global allocation). 0 trains no attention. Overrides the budget for attention."
        },
    )
    head_ratio: float | None = field(
        default=None,
        metadata={"help": "Fraction in (0, 1] of the attention heads to train. Overrides the budget for attention."},
    )
    channels_per_layer: int | None = field(
        default=None,
        metadata={
            "help": "Number of FFN channels trained per adapted layer (uniform allocation) or in total "
            "(global allocation). 0 trains no FFN. Overrides the budget for the FFN."
        },
    )
    channel_ratio: float | None = field(
        default=None,
        metadata={"help": "Fraction in (0, 1] of the FFN channels to train. Overrides the budget for the FFN."},
    )
    selection: SelectionStrategy = field(
        default="random",
        metadata={
            "help": "How heads and channels are chosen: 'random' (seeded, the paper's default S2FT-R); by the "
            "largest / smallest norm of their output- or down-projection columns: 'weight_*' (S2FT-W), of the "
            "activations those columns read on calibration data: 'activation_*' (S2FT-A), of both: "
            "'weight_activation_*' (S2FT-S), or of the loss gradient of those columns: 'gradient_*' (S2FT-G). "
            "The data-driven ones need peft_s2ft.calibrate_selection(model, config, batches) before get_peft_model."
        },
    )
    calibration: dict | None = field(
        default=None,
        metadata={
            "help": "Filled in by peft_s2ft.calibrate_selection for the data-driven strategies: the statistic and how "
            "many batches and tokens it was computed on. The selected indices are in the adapter file, so loading "
            "an adapter needs no data."
        },
    )
    allocation: Literal["uniform", "global"] = field(
        default="uniform",
        metadata={
            "help": "'uniform': the same number of heads and channels in every adapted layer (the paper). "
            "'global': the budget is chosen over all layers at once, so per-layer counts vary (the official code)."
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the selection. It does not touch torch's global random state. A config read from an "
            "adapter folder (S2FTConfig.from_pretrained, as PeftModel.from_pretrained does) takes that adapter's "
            "selection from its file instead, as long as its selection fields are left as read."
        },
    )
    disjoint_from: list[str] | None = field(
        default=None,
        metadata={
            "help": "Adapters whose selected heads and channels this adapter must not select: names of S2FT adapters "
            "already on the model, or folders / hub ids of saved S2FT adapters. Adapters with disjoint selections "
            "fuse without interfering (add_weighted_adapter adds them column by column). Only a fresh selection "
            "reads it, and it is not saved: the adapter file holds the selection it produced, and loading follows "
            "the file without needing those adapters."
        },
    )
    train_v: bool = field(
        default=False,
        metadata={
            "help": "Also train the value-projection rows of the K/V groups of the selected heads. Adds "
            "parameters beyond the budget, and saves the full attention input for backward."
        },
    )
    train_up: bool = field(
        default=False,
        metadata={
            "help": "Also train the up-projection rows of the selected channels. Adds parameters beyond the "
            "budget, and saves the full FFN input for backward."
        },
    )
    permute: bool = field(
        default=False,
        metadata={
            "help": "Physically co-permute the coupled weights once, so that the selected block is contiguous: its "
            "input is a slice rather than a gather (the paper's layout). The state dict still shows the original "
            "order. One adapter per model; every described dense family (each family's description lists all its "
            "per-head tensors), refused with ALiBi position biases and on fused mixture-of-experts layers. On GQA "
            "models this mode fills whole K/V groups first when it selects heads, so that the block can be "
            "contiguous. Default False: the selection is applied as index maps. Neither mode writes the base "
            "weights during training."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the adapter starts as a zero delta (the model is unchanged). False: a small random "
            "non-zero delta, for tests that need to see the adapter act."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Filled in automatically from the model's architecture description (its output and down "
            "projections, plus value and up projections when trained, by their paths inside a layer, e.g. "
            "'self_attn.o_proj'). Only those modules can be targeted; listing some of them restricts training to them."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names or a regex of modules not to adapt."},
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={"help": "Indices of the decoder layers to adapt. All of them when unset."},
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name of the layer list (e.g. 'layers'), used with `layers_to_transform`."},
    )
    base_geometry: dict | None = field(
        default=None,
        metadata={
            "help": "Filled in when the adapter is created: the family, head geometry and FFN/expert sizes of the base "
            "model it was made for. Loading its weights onto a base model whose geometry differs is refused, since "
            "the same column indices would mean other heads or channels there."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules apart from the adapter layers that are fully trained and saved (e.g. a classifier)."
        },
    )
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None,
        metadata={
            "help": "Rows of an embedding to train besides the adapter, as LoRA's field of the same name (PEFT's "
            "TrainableTokens): a list of token ids for the input embedding, or {embedding module name: ids}. TRL sets "
            "it for tokens it adds to the vocabulary; only those rows are trained and saved."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = S2FTPeftType.S2FT
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.disjoint_from, str):
            self.disjoint_from = [self.disjoint_from]
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"S2FTConfig.{name}={getattr(self, name)!r}: {why}")

        if not 0 < self.trainable_ratio <= 1:
            fail("trainable_ratio", "must be in (0, 1], e.g. 0.01 for 1% of the parameters.")
        if not 0 <= self.attention_share <= 1:
            fail("attention_share", "must be in [0, 1] (0 = FFN only, 1 = attention only).")
        for name in ("head_ratio", "channel_ratio"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                fail(name, "must be in (0, 1]; use the *_per_layer count field to train none.")
        for name in ("heads_per_layer", "channels_per_layer"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                fail(name, "must be a non-negative integer count.")
        if self.heads_per_layer is not None and self.head_ratio is not None:
            fail("head_ratio", "set either heads_per_layer or head_ratio, not both.")
        if self.channels_per_layer is not None and self.channel_ratio is not None:
            fail("channel_ratio", "set either channels_per_layer or channel_ratio, not both.")
        if self.heads_per_layer == 0 and self.channels_per_layer == 0:
            fail("channels_per_layer", "heads_per_layer and channels_per_layer are both 0: nothing to train.")
        if self.selection not in SELECTION_STRATEGIES:
            fail("selection", f"unknown strategy; choose one of {', '.join(SELECTION_STRATEGIES)}.")
        if self.allocation not in ALLOCATIONS:
            fail("allocation", f"unknown allocation; choose one of {', '.join(ALLOCATIONS)}.")
        if self.layers_pattern and self.layers_to_transform is None:
            fail("layers_pattern", "only has an effect together with layers_to_transform.")
        if self.disjoint_from is not None and (
            not isinstance(self.disjoint_from, (list, tuple)) or not all(isinstance(a, str) for a in self.disjoint_from)
        ):
            fail("disjoint_from", "must be a list of adapter names on the model or paths of saved S2FT adapters.")
        if self.train_v and self.attention_off:
            fail("train_v", "trains the value rows of the selected heads, but this config selects no heads.")
        if self.train_up and self.ffn_off:
            fail("train_up", "trains the up rows of the selected channels, but this config selects no channels.")

    @property
    def attention_off(self) -> bool:
        """True when no budget can select a head."""
        return self.heads_per_layer == 0 or (
            self.heads_per_layer is None and self.head_ratio is None and self.attention_share == 0
        )

    @property
    def sets_attention_budget(self) -> bool:
        """True when a field asks for heads explicitly."""
        return self.head_ratio is not None or self.heads_per_layer not in (None, 0)

    @property
    def sets_ffn_budget(self) -> bool:
        """True when a field asks for FFN channels explicitly."""
        return self.channel_ratio is not None or self.channels_per_layer not in (None, 0)

    @property
    def ffn_off(self) -> bool:
        """True when no budget can select an FFN channel."""
        return self.channels_per_layer == 0 or (
            self.channels_per_layer is None and self.channel_ratio is None and self.attention_share == 1
        )

    def default_roles(self) -> set[str]:
        """The roles an adapter may train given which budgets can be non-zero: "output" (O columns of heads),
        "value" (V rows, with train_v), "down" (down columns of channels), "up" (up rows, with train_up),
        "experts" (down columns of channels of every expert of a fused MoE layer)."""
        roles = set()
        if not self.attention_off:
            roles |= {"output"} | ({"value"} if self.train_v else set())
        if not self.ffn_off:
            roles |= {"down", "experts"} | ({"up"} if self.train_up else set())
        return roles

    def selection_fingerprint(self) -> tuple:
        """Every field that decides which units are selected (target_modules resolved as injection resolves it)."""
        targets = ("<roles>", *sorted(self.default_roles())) if self.target_modules is None else self.target_modules
        values = [getattr(self, name) for name in SELECTION_FIELDS] + [targets]
        return tuple(tuple(sorted(v)) if isinstance(v, (set, list)) else v for v in values)
