"""Data-driven selection, the paper's S2FT-A, S2FT-S and S2FT-G: unit scores from a few calibration batches.

`get_peft_model` never sees data, so, as PEFT does for LoRA's EVA and CorDA initialisations, a separate step runs
the model on calibration batches first and leaves the statistics on the config; selection then reads them:

    config = S2FTConfig(selection="activation_small")
    calibrate_selection(model, config, batches)  # a few batches, e.g. 1% of the fine-tuning data
    peft_model = get_peft_model(model, config)

Per input column c of every block's output projection (O for a head, down for an FFN channel) the pass keeps one
running sum over the batches, nothing else:

- activation: the sum over (non-padding) tokens of x_c², x being that projection's input;
- gradient: the sum over batches of the squared norm of the loss gradient of the weight's column c.

A unit's score is the root of the sum over its columns: ||X_u|| (activation), ||W_u diag(||X_c||)|| (weight x
activation, Wanda's per-weight score |W_ic| ||X_c|| in the Frobenius norm), ||G_u|| (gradient). The adapter file
keeps the selected indices, so loading an adapter never needs the data again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import OUTPUT, describe
from .architectures.discovery import Block, base_layer_of
from .config import S2FTConfig
from .linear_like import features, logical_weight

# Strategy -> the statistic its scores need.
DATA_DRIVEN = {
    "activation_large": "activation",
    "activation_small": "activation",
    "weight_activation_large": "activation",
    "weight_activation_small": "activation",
    "gradient_large": "gradient",
    "gradient_small": "gradient",
}


def needs_calibration(strategy: str) -> bool:
    return strategy in DATA_DRIVEN


@dataclass
class CalibrationScores:
    """Per block (keyed like selection's blocks: the path of its O or down projection), one value per input column
    of that projection: the sum of squares named by `statistic`."""

    statistic: str
    columns: dict[str, torch.Tensor]
    batches: int = 0
    tokens: int = 0
    summary: dict = field(default_factory=dict)
    signature: dict[str, float] = field(default_factory=dict)  # block key -> _weight_signature at calibration

    def check_covers(self, blocks: Iterable[Block], model: nn.Module) -> None:
        """Refuse scores computed on another model: every block must be there, with its columns and weights."""
        for block in blocks:
            column_sums = self.columns.get(block.key)
            module = base_layer_of(model.get_submodule(block.key))
            in_features = features(module)[1]
            if (
                column_sums is None
                or column_sums.numel() != in_features
                or self.signature.get(block.key) != _weight_signature(module)
            ):
                raise ValueError(
                    f"The calibration scores on this S2FTConfig were computed on another model: {block.key} has other "
                    "weights or columns here. Run peft_s2ft.calibrate_selection(model, config, batches) on the model "
                    "you give get_peft_model."
                )

    def unit_scores(self, strategy: str, block: Block, output_weight: torch.Tensor) -> torch.Tensor:
        """The score of each unit of `block` under `strategy` (larger first for *_large, negated for *_small)."""
        if DATA_DRIVEN[strategy] != self.statistic:
            raise ValueError(
                f"S2FTConfig.selection='{strategy}' needs {DATA_DRIVEN[strategy]} statistics, but the config was "
                f"calibrated for {self.statistic}: run peft_s2ft.calibrate_selection again after changing selection."
            )
        span = block.trained[OUTPUT if block.kind == "attention" else "down"]
        columns = span.positions(torch.arange(block.num_units))
        per_column = self.columns[block.key].double().index_select(0, columns)
        if strategy.startswith("weight_activation"):
            weight = output_weight.detach().double().index_select(1, columns.to(output_weight.device))
            per_column = per_column * weight.square().sum(dim=0).cpu()
        scores = per_column.reshape(block.num_units, span.width).sum(dim=1).sqrt()
        return scores if strategy.endswith("_large") else -scores


def calibrate_selection(
    model: nn.Module,
    config: S2FTConfig,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    max_batches: int | None = None,
    progress: bool = True,
) -> CalibrationScores:
    """Score every head and FFN channel of `model` on `batches` for `config.selection`, and keep the scores on
    `config` for `get_peft_model`.

    `batches` are dicts the model takes as keyword arguments (a DataLoader over tokenized data), on any device:
    each is moved to the model's device. Padding (`attention_mask == 0`) is left out of the activation sums. The
    gradient statistic needs a loss: batches with `labels`, or, for a causal LM, the input ids themselves as labels.
    The model runs in eval mode and is put back as it was; no weight or `requires_grad` flag changes.
    """
    strategy = config.selection
    if strategy not in DATA_DRIVEN:
        raise ValueError(
            f"S2FTConfig.selection='{strategy}' does not read data; calibrate_selection is for "
            f"{', '.join(DATA_DRIVEN)}."
        )
    structure = describe(model)
    if structure.experts:
        raise ValueError(
            f"Data-driven selection scores dense heads and channels, not the channels inside fused experts "
            f"({structure.experts[0].key}): use selection='random' or 'weight_large' / 'weight_small' on this "
            "mixture-of-experts model."
        )
    blocks = list(structure.attention) + list(structure.ffn)
    statistic = DATA_DRIVEN[strategy]
    device = next(model.parameters()).device
    accumulate = _ActivationSums(model, blocks) if statistic == "activation" else _GradientSums(model, blocks)
    was_training = model.training
    model.eval()
    count = 0
    try:
        with accumulate:
            for batch in _progress(batches, max_batches, progress):
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                accumulate.run(model, batch)
                count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("calibrate_selection got no batches: pass a few batches of the fine-tuning data.")
    signature = {b.key: _weight_signature(base_layer_of(model.get_submodule(b.key))) for b in blocks}
    scores = CalibrationScores(statistic, accumulate.sums(), count, accumulate.tokens, signature=signature)
    scores.summary = {"statistic": statistic, "batches": count, "tokens": accumulate.tokens}
    config._calibration = scores
    config.calibration = dict(scores.summary)
    vars(config).pop("_adapter_source", None)  # calibrating asks for a fresh selection, not a folder's
    return scores


def _weight_signature(module: nn.Module) -> float:
    """A cheap fingerprint of a projection's weight (its first two output rows), telling another model's apart."""
    return logical_weight(module)[:2].detach().double().sum().item()


def _progress(batches: Iterable, max_batches: int | None, progress: bool) -> Iterator:
    from tqdm.auto import tqdm

    total = max_batches
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    for i, batch in enumerate(tqdm(batches, total=total, desc="S2FT calibration", disable=not progress)):
        if max_batches is not None and i >= max_batches:
            break
        yield batch


def _token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The projection input as (tokens, features) without padding, whether it comes (batch, positions, features)
    or already flattened (batch x positions, features)."""
    rows = x.reshape(-1, x.shape[-1])
    if mask is not None and mask.numel() == rows.shape[0]:
        rows = rows[mask.reshape(-1).to(rows.device).bool()]
    return rows


class _ActivationSums(contextlib.AbstractContextManager):
    """Forward pre-hooks on every output projection, summing x_c² over non-padding tokens."""

    def __init__(self, model: nn.Module, blocks: list[Block]) -> None:
        self.modules = {b.key: base_layer_of(model.get_submodule(b.key)) for b in blocks}
        self.totals: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self.tokens = 0
        self.handles = []

    def __enter__(self):
        for key, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(self._hook(key)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, key: str):
        def hook(module, args):
            rows = _token_rows(args[0].detach(), self.mask).float()
            total = rows.square().sum(dim=0)
            self.totals[key] = total if key not in self.totals else self.totals[key] + total

        return hook

    def run(self, model: nn.Module, batch: dict) -> None:
        self.mask = batch.get("attention_mask")
        ids = batch.get("input_ids")
        if self.mask is not None:
            self.tokens += int(self.mask.sum())
        elif ids is not None:
            self.tokens += ids.numel()
        with torch.no_grad():
            model(**batch)

    def sums(self) -> dict[str, torch.Tensor]:
        return {key: total.cpu() for key, total in self.totals.items()}


class _GradientSums(contextlib.AbstractContextManager):
    """Per batch, the loss gradient of every output projection's weight, reduced at once to per-column squares."""

    def __init__(self, model: nn.Module, blocks: list[Block]) -> None:
        self.modules = {b.key: base_layer_of(model.get_submodule(b.key)) for b in blocks}
        self.model = model
        self.totals: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.requires_grad: dict[int, bool] = {}

    def __enter__(self):
        # Only the output projections' weights take gradients, so backward computes no other weight's.
        self.requires_grad = {id(p): p.requires_grad for p in self.model.parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        for module in self.modules.values():
            module.weight.requires_grad_(True)
        return self

    def __exit__(self, *exc) -> None:
        for module in self.modules.values():
            module.weight.grad = None
        for p in self.model.parameters():
            p.requires_grad_(self.requires_grad[id(p)])

    def run(self, model: nn.Module, batch: dict) -> None:
        batch = dict(batch)
        if "labels" not in batch:
            ids = batch.get("input_ids")
            if ids is None or not _is_causal_lm(model):
                raise ValueError(
                    "selection='gradient_*' needs a loss: give calibration batches with `labels` (a causal LM can "
                    "take its input_ids as labels, which is what happens when a batch has input_ids and no labels)."
                )
            labels = ids.clone()
            if batch.get("attention_mask") is not None:
                labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
            batch["labels"] = labels
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        loss = model(**batch).loss
        if loss is None:
            raise ValueError("The model returned no loss for a calibration batch with labels: gradient scores need it.")
        loss.backward()
        for key, module in self.modules.items():
            grad = logical_weight(module, module.weight.grad).float()
            total = grad.square().sum(dim=0)
            self.totals[key] = total if key not in self.totals else self.totals[key] + total
            module.weight.grad = None

    def sums(self) -> dict[str, torch.Tensor]:
        return {key: total.cpu() for key, total in self.totals.items()}


def _is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(getattr(model, "config", None), "model_type", None))
    return causal is not None and type(model).__name__ in ((causal,) if isinstance(causal, str) else tuple(causal))
