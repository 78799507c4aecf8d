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
from .checkpoint import root_model
from .config import S2FTConfig
from .linear_like import features, readable_weight, weight_values

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
    signature: dict[str, tuple[float, float]] = field(default_factory=dict)  # block key -> _weight_signature

    def check_covers(self, blocks: Iterable[Block], model: nn.Module) -> None:
        """Refuse scores computed on another model: every block must be there, with its columns and weights."""
        for block in blocks:
            column_sums = self.columns.get(block.key)
            module = base_layer_of(model.get_submodule(block.key))
            in_features = features(module)[1]
            if (
                column_sums is None
                or column_sums.numel() != in_features
                or not _same_weights(self.signature.get(block.key), _weight_signature(module))
            ):
                raise ValueError(
                    f"The calibration scores on this S2FTConfig were computed on another model: {block.key} has other "
                    "weights or columns here (or its weights were changed, e.g. merged into, since). Run "
                    "peft_s2ft.calibrate_selection(model, config, batches) on the model you give get_peft_model."
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
            output_weight = weight_values(output_weight)
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
    """Score every dense head and FFN channel of `model` on `batches` for `config.selection`, and keep the scores on
    `config` for `get_peft_model` (or `add_adapter`).

    `batches` are dicts the model takes as keyword arguments (a DataLoader over tokenized data), on any device:
    each is moved to the model's device. Padding (`attention_mask == 0`) is left out of the activation sums. The
    gradient statistic needs a loss: batches with `labels` (batches whose labels are all -100 are skipped), or, for a
    causal LM, the input ids themselves as labels. `model` may already hold adapters (a PeftModel): it is scored as it
    runs. It runs in eval mode and is put back as it was; no weight, gradient or `requires_grad` flag changes.
    Channels inside fused experts are not scored (selection refuses data-driven strategies there).
    """
    strategy = config.selection
    if strategy not in DATA_DRIVEN:
        raise ValueError(
            f"S2FTConfig.selection='{strategy}' does not read data; calibrate_selection is for "
            f"{', '.join(DATA_DRIVEN)}."
        )
    root = root_model(model)
    structure = describe(root)
    blocks = list(structure.attention) + list(structure.ffn)
    statistic = DATA_DRIVEN[strategy]
    device = next(model.parameters()).device
    accumulate = _ActivationSums(root, blocks) if statistic == "activation" else _GradientSums(root, blocks)
    was_training = model.training
    model.eval()
    count = 0
    try:
        with accumulate:
            for batch in _progress(batches, max_batches, progress):
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                count += accumulate.run(model, batch)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(
            "calibrate_selection got no batches it could use: pass a few batches of the fine-tuning data (for "
            "gradient_*, with some labels that are not -100)."
        )
    sums = accumulate.sums()
    bad = [key for key, total in sums.items() if not torch.isfinite(total).all()]
    if bad:
        raise ValueError(
            f"The calibration statistics of {bad[0]} (and {len(bad) - 1} more) are not finite (NaN or inf): the model "
            "overflowed on these batches; calibrate in float32 or on other batches."
        )
    signature = {b.key: _weight_signature(base_layer_of(root.get_submodule(b.key))) for b in blocks}
    scores = CalibrationScores(statistic, sums, count, accumulate.tokens, signature=signature)
    scores.summary = {"statistic": statistic, "batches": count, "tokens": accumulate.tokens}
    config._calibration = scores
    config.calibration = dict(scores.summary)
    vars(config).pop("_adapter_source", None)  # calibrating asks for a fresh selection, not a folder's
    return scores


def _weight_signature(module: nn.Module) -> tuple[float, float]:
    """A cheap fingerprint of a projection's weight (sum and absolute sum of its first two output rows)."""
    rows = weight_values(readable_weight(module))[:2].detach().double()
    return rows.sum().item(), rows.abs().sum().item()


def _same_weights(saved: tuple[float, float] | None, current: tuple[float, float]) -> bool:
    """Equal up to rounding (a cast to bf16 moves each weight by at most 2^-8 of itself), not another model's."""
    if saved is None:
        return False
    return abs(saved[0] - current[0]) <= 1e-2 * max(saved[1], current[1]) + 1e-12


def _progress(batches: Iterable, max_batches: int | None, progress: bool) -> Iterator:
    from tqdm.auto import tqdm

    total = max_batches
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    for i, batch in enumerate(tqdm(batches, total=total, desc="S2FT calibration", disable=not progress)):
        if max_batches is not None and i >= max_batches:
            break
        yield batch


def _token_rows(x: torch.Tensor, mask: torch.Tensor | None, where: str) -> torch.Tensor:
    """The projection input as (tokens, features) without padding, whether it comes (batch, positions, features)
    or already flattened (batch x positions, features)."""
    rows = x.reshape(-1, x.shape[-1])
    if mask is None:
        return rows
    if x.shape[:-1] != mask.shape and rows.shape[0] != mask.numel():
        raise ValueError(
            f"{where} received an input of shape {tuple(x.shape)} that the batch's attention_mask {tuple(mask.shape)} "
            "does not describe, so padding cannot be left out: calibrate with batches whose attention_mask is "
            "(batch, positions) of input_ids, or without one."
        )
    return rows[mask.reshape(-1).to(rows.device).bool()]


def _tokens_in(batch: dict) -> int:
    mask, ids = batch.get("attention_mask"), batch.get("input_ids")
    if mask is not None:
        return int(mask.sum())
    return ids.numel() if ids is not None else 0


class _ColumnSums(contextlib.AbstractContextManager):
    """What both statistics share: per block a running per-column sum, and the hooks that feed it (removed on
    exit). Each block's module is its output projection, or the adapter layer wrapping it: the same input."""

    def __init__(self, root: nn.Module, blocks: list[Block]) -> None:
        self.modules = {b.key: root.get_submodule(b.key) for b in blocks}
        self.totals: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.handles = []

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def add(self, key: str, total: torch.Tensor) -> None:
        self.totals[key] = total if key not in self.totals else self.totals[key] + total

    def sums(self) -> dict[str, torch.Tensor]:
        return {key: total.cpu() for key, total in self.totals.items()}


class _ActivationSums(_ColumnSums):
    """Forward pre-hooks on every output projection, summing x_c² over non-padding tokens."""

    def __init__(self, root: nn.Module, blocks: list[Block]) -> None:
        super().__init__(root, blocks)
        self.mask: torch.Tensor | None = None

    def __enter__(self):
        for key, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(self._hook(key)))
        return self

    def _hook(self, key: str):
        def hook(module, args):
            self.add(key, _token_rows(args[0].detach(), self.mask, key).float().square().sum(dim=0))

        return hook

    def run(self, model: nn.Module, batch: dict) -> int:
        self.mask = batch.get("attention_mask")
        self.tokens += _tokens_in(batch)
        with torch.no_grad():
            model(**batch)
        return 1


class _GradientSums(_ColumnSums):
    """Per batch, the loss gradient of every output projection's weight, G = sum over tokens of g x^T, from module
    hooks (each projection's input and output gradient), reduced at once to per-column squares.

    No parameter's `requires_grad` or `.grad` is touched: the input embeddings' output becomes a leaf that requires
    grad and `torch.autograd.grad` differentiates the loss down to it only, through every layer of a frozen (or
    quantized, or adapter-wrapped) model.
    """

    def __init__(self, root: nn.Module, blocks: list[Block]) -> None:
        super().__init__(root, blocks)
        self.root = root
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.batch_grads: dict[str, torch.Tensor] = {}
        self.embedded: list[torch.Tensor] = []

    def __enter__(self):
        embeddings = self.root.get_input_embeddings() if hasattr(self.root, "get_input_embeddings") else None
        if embeddings is None:
            raise ValueError("gradient_* selection needs the model's input embeddings (get_input_embeddings()).")
        self.handles.append(embeddings.register_forward_hook(self._track_embeddings))
        for key, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._keep_input(key)))
            self.handles.append(module.register_full_backward_hook(self._add_gradient(key)))
        return self

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.inputs.clear()
        self.batch_grads.clear()
        self.embedded.clear()

    def _track_embeddings(self, module, args, output):
        # A leaf that requires grad: backward runs through every layer even when no parameter requires grad.
        output = output.detach().requires_grad_(True)
        self.embedded.append(output)
        return output

    def _keep_input(self, key: str):
        def hook(module, args, output):
            self.inputs.setdefault(key, []).append(args[0].detach())

        return hook

    def _add_gradient(self, key: str):
        def hook(module, grad_input, grad_output):
            x = self.inputs[key].pop()
            g = grad_output[0]
            grad = g.reshape(-1, g.shape[-1]).float().t() @ x.reshape(-1, x.shape[-1]).float()  # (out, in)
            self.batch_grads[key] = grad if key not in self.batch_grads else self.batch_grads[key] + grad

        return hook

    def run(self, model: nn.Module, batch: dict) -> int:
        batch = dict(batch)
        if "labels" not in batch:
            ids = batch.get("input_ids")
            if ids is None or not _is_causal_lm(self.root):
                raise ValueError(
                    "selection='gradient_*' needs a loss: give calibration batches with `labels` (a causal LM can "
                    "take its input_ids as labels, which is what happens when a batch has input_ids and no labels)."
                )
            labels = ids.clone()
            if batch.get("attention_mask") is not None:
                labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
            batch["labels"] = labels
        if not (batch["labels"] != -100).any():
            return 0  # nothing supervised: the loss would be NaN
        with torch.enable_grad():
            loss = model(**batch).loss
            if loss is None:
                raise ValueError("The model returned no loss for a calibration batch with labels: gradient_* needs it.")
            if not torch.isfinite(loss):
                raise ValueError(f"A calibration batch gave a non-finite loss ({loss.item()}); check its labels.")
            # Gradients only as far as the embeddings' output: no parameter's .grad is written.
            torch.autograd.grad(loss, self.embedded, allow_unused=True)
        self.embedded.clear()
        self.tokens += _tokens_in(batch)
        for key, grad in self.batch_grads.items():
            self.add(key, grad.square().sum(dim=0))
        self.batch_grads.clear()
        self.inputs.clear()
        return 1


def _is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(getattr(model, "config", None), "model_type", None))
    return causal is not None and type(model).__name__ in ((causal,) if isinstance(causal, str) else tuple(causal))
