"""Quantized base layers (QS2FT): what S2FT needs to know about a linear layer whose weight is stored quantized.

S2FT never writes the frozen weight in forward or backward, so a quantized weight can sit underneath: the forward
calls the quantized layer itself and adds `x[..., S] D^T` (the delta is a float32 parameter of its own), the
backward computes the input gradient with the dequantized weight, as bitsandbytes' own backward does, and saves
only `x[..., S]` (see `partial_backprop.BasePlusSparseDelta`). Each supported storage is one `QuantizedFormat`,
a row of data: how to recognise it, dequantize it to (out, in), quantize new values like it (merging), and which
objects hold it (kept as the merge backup, so unmerging puts back the very same quantized storage).

Reading columns dequantizes the whole weight of that one layer, transiently: weight-based selection scores every
column anyway, and merging requantizes whole rows (each row or block has its own scale), so a column-wise reader
would save no work. Permute mode and quantized fused experts are refused (see `refuse_permute`, `check_plain`).
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

PLAIN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The dtype of every delta on a quantized base: the high-precision parameter QLoRA also trains.
DELTA_DTYPE = torch.float32


@dataclass(frozen=True)
class QuantizedFormat:
    """One quantized storage of a linear layer's weight, described by what S2FT does with it."""

    name: str
    package: str
    matches: Callable[[nn.Module], bool]
    dequantize: Callable[[nn.Module], torch.Tensor]  # (out, in), a new tensor in the weight's original precision
    quantize: Callable[[nn.Module, torch.Tensor, Any], None]  # store (out, in) values as a new quantized weight
    storage: Callable[[nn.Module], tuple]  # the objects that hold the quantized weight now
    restore: Callable[[nn.Module, tuple], None]  # put such objects back
    check: Callable[[nn.Module], None] = lambda module: None  # refuse variants S2FT does not support
    needs_recipe: bool = False  # quantizing needs the model's quantization config (`recipe_of`)


def _loaded(package: str):
    """The package if it is imported: a model cannot hold its layers otherwise, and nothing is imported here."""
    return sys.modules.get(package)


# ------------------------------------------------------------------------------------------------------------------
# bitsandbytes 4-bit (nf4, fp4): Params4bit, packed nibbles plus per-block absmax (optionally itself quantized)
def _is_bnb_4bit(module: nn.Module) -> bool:
    bnb = _loaded("bitsandbytes")
    return bnb is not None and isinstance(getattr(module, "weight", None), bnb.nn.Params4bit)


def _dequantize_bnb_4bit(module: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional

    weight = module.weight
    state = weight.quant_state if weight.quant_state is not None else getattr(module, "quant_state", None)
    if state is None:
        raise ValueError(f"This bitsandbytes 4-bit layer ({module}) has no quantization state: move it to its device.")
    if not getattr(state, "packing_format_for_cpu", False):
        return bnb_functional.dequantize_4bit(weight.data, state)
    # bitsandbytes repacks a 4-bit weight in place for CPU inference (an eval-mode forward without gradients on an
    # AVX512-BF16 CPU): nibbles reordered, absmax un-nested, transposed to (K / blocksize, N) and cast to bf16.
    # Undo the nibble order on copies and read the absmax the layer now computes with.
    nibbles, _ = bnb_functional._convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(state))
    unpacked = bnb_functional.QuantState(
        absmax=state.absmax.t().reshape(-1).float(),
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=getattr(state, "original_dtype", torch.float32),
    )
    return bnb_functional.dequantize_4bit(nibbles.view(torch.uint8), unpacked)


def _quantize_bnb_4bit(module: nn.Module, values: torch.Tensor, recipe: Any) -> None:
    import bitsandbytes as bnb

    weight = module.weight
    settings = {k: weight.__dict__[k] for k in ("blocksize", "compress_statistics", "quant_type", "quant_storage")}
    new = bnb.nn.Params4bit(values.to("cpu"), requires_grad=False, module=module, **settings)
    module.weight = new.to(weight.device)  # quantizes, and sets module.quant_state


def _bnb_4bit_storage(module: nn.Module) -> tuple:
    return (module.weight, getattr(module, "quant_state", None))


def _restore_bnb_4bit(module: nn.Module, storage: tuple) -> None:
    module.weight, quant_state = storage
    if quant_state is not None:
        module.quant_state = quant_state


# ------------------------------------------------------------------------------------------------------------------
# bitsandbytes 8-bit (LLM.int8()): Int8Params, int8 rows CB with one absmax per row, SCB; W = CB * SCB / 127
def _is_bnb_8bit(module: nn.Module) -> bool:
    bnb = _loaded("bitsandbytes")
    return bnb is not None and isinstance(getattr(module, "weight", None), bnb.nn.Int8Params)


def _check_bnb_8bit(module: nn.Module) -> None:
    if module.weight.dtype != torch.int8 or getattr(module.state, "has_fp16_weights", False):
        raise ValueError(
            "S2FT supports bitsandbytes 8-bit layers that store int8 weights (has_fp16_weights=False, transformers' "
            "load_in_8bit): this one keeps a float weight that bitsandbytes requantizes at every forward. Load the "
            "model with BitsAndBytesConfig(load_in_8bit=True)."
        )


def _dequantize_bnb_8bit(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    # After its first forward the layer moves the row scales from the parameter to its matmul state.
    scale = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    if scale is None:
        raise ValueError(f"This bitsandbytes 8-bit layer ({module}) has no row scales (SCB): move it to its device.")
    return weight.data.float() * (scale.float() / 127.0).unsqueeze(1)


def _quantize_bnb_8bit(module: nn.Module, values: torch.Tensor, recipe: Any) -> None:
    import bitsandbytes as bnb

    device = module.weight.device
    module.weight = bnb.nn.Int8Params(values.to("cpu"), requires_grad=False, has_fp16_weights=False).to(device)
    module.state.reset_grads()  # the next forward takes CB and SCB from the new parameter


def _bnb_8bit_storage(module: nn.Module) -> tuple:
    return (module.weight, module.state.CB, module.state.SCB)


def _restore_bnb_8bit(module: nn.Module, storage: tuple) -> None:
    module.weight, module.state.CB, module.state.SCB = storage


# ------------------------------------------------------------------------------------------------------------------
# torchao: a tensor subclass as the weight of a plain nn.Linear; requantized with the model's TorchAoConfig
TORCHAO_TYPES = ("Int8Tensor",)  # what has been tested (Int8WeightOnlyConfig); others are refused


def _is_torchao(module: nn.Module) -> bool:
    torchao = _loaded("torchao")
    if torchao is None:
        return False
    from torchao.utils import TorchAOBaseTensor

    return isinstance(getattr(module, "weight", None), TorchAOBaseTensor)


def _check_torchao(module: nn.Module) -> None:
    kind = type(module.weight).__name__
    if kind not in TORCHAO_TYPES:
        raise ValueError(
            f"S2FT supports torchao weights of type {', '.join(TORCHAO_TYPES)} (Int8WeightOnlyConfig), not {kind}: "
            "it has not been tested with that storage. Quantize the base model with Int8WeightOnlyConfig."
        )


def _dequantize_torchao(module: nn.Module) -> torch.Tensor:
    return module.weight.dequantize()


def _quantize_torchao(module: nn.Module, values: torch.Tensor, recipe: Any) -> None:
    from torchao.quantization import quantize_

    if recipe is None:
        raise ValueError(
            "Merging into a torchao weight requantizes it with the model's quantization config, and this S2FT layer "
            "was not given one: load the base model with transformers and TorchAoConfig(...) so the config is on the "
            "model (model.hf_quantizer), then create the adapter with get_peft_model / PeftModel.from_pretrained."
        )
    del module.weight
    module.weight = nn.Parameter(values, requires_grad=False)
    quantize_(module, recipe.get_apply_tensor_subclass())


def _torchao_storage(module: nn.Module) -> tuple:
    return (module.weight,)


def _restore_torchao(module: nn.Module, storage: tuple) -> None:
    (module.weight,) = storage


FORMATS: tuple[QuantizedFormat, ...] = (
    QuantizedFormat(
        "bitsandbytes 4-bit",
        "bitsandbytes",
        _is_bnb_4bit,
        _dequantize_bnb_4bit,
        _quantize_bnb_4bit,
        _bnb_4bit_storage,
        _restore_bnb_4bit,
    ),
    QuantizedFormat(
        "bitsandbytes 8-bit",
        "bitsandbytes",
        _is_bnb_8bit,
        _dequantize_bnb_8bit,
        _quantize_bnb_8bit,
        _bnb_8bit_storage,
        _restore_bnb_8bit,
        check=_check_bnb_8bit,
    ),
    QuantizedFormat(
        "torchao",
        "torchao",
        _is_torchao,
        _dequantize_torchao,
        _quantize_torchao,
        _torchao_storage,
        _restore_torchao,
        check=_check_torchao,
        needs_recipe=True,
    ),
)


def format_of(module: nn.Module) -> QuantizedFormat | None:
    """The quantized format of a linear layer's weight; None for a plain float weight. Any other weight (float8, an
    integer tensor, an unknown quantized tensor type) is refused: S2FT could not read or merge it correctly."""
    for fmt in FORMATS:
        if fmt.matches(module):
            fmt.check(module)
            return fmt
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dtype not in PLAIN_DTYPES:
        raise ValueError(
            f"S2FT cannot adapt a {type(module).__name__} whose weight is {type(weight).__name__} of dtype "
            f"{weight.dtype}: it supports float weights and quantized bases from bitsandbytes (4-bit, 8-bit) and "
            f"torchao ({', '.join(TORCHAO_TYPES)}). Leave this layer out (exclude_modules) or load it unquantized."
        )
    return None


def is_quantized(module: nn.Module) -> bool:
    return format_of(module) is not None


def recipe_of(model: nn.Module) -> Any:
    """The model's quantization config (transformers keeps it on `model.hf_quantizer`), which torchao needs to
    quantize merged values like the original weight; None when the model has none."""
    quantizer = getattr(model, "hf_quantizer", None)
    return getattr(quantizer, "quantization_config", None)


class QuantizedWeight:
    """The (out, in) weight of a quantized linear layer for selection and calibration to read: its shape at no
    cost, its values dequantized on demand (one layer at a time, never all layers' at once)."""

    is_meta = False

    def __init__(self, module: nn.Module, fmt: QuantizedFormat) -> None:
        self.module, self.format = module, fmt
        self.shape = torch.Size((module.out_features, module.in_features))

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    def values(self) -> torch.Tensor:
        return self.format.dequantize(self.module).detach()


def check_plain(tensor: torch.Tensor, where: str) -> None:
    """Refuse a quantized tensor where S2FT reads or adds to it as a float tensor (fused experts' weights)."""
    if tensor.dtype not in PLAIN_DTYPES or type(tensor) not in (torch.Tensor, nn.Parameter):
        raise ValueError(
            f"S2FT cannot train {where}: its weight is {type(tensor).__name__} of dtype {tensor.dtype} (quantized). "
            "S2FT on a quantized base supports linear layers only; leave the experts out of target_modules or load "
            "them unquantized."
        )


def refuse_permute(model: nn.Module) -> None:
    """permute=True reorders rows and columns of the weights in place, which a quantized storage (packed nibbles
    with per-block scales) does not allow without requantizing: refuse it before anything changes."""
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) and format_of(module) is not None:
            raise ValueError(
                f"S2FTConfig.permute=True physically reorders the coupled weights, but '{path}' is quantized "
                f"({format_of(module).name}), which cannot be permuted without requantizing it. Use permute=False "
                "(the default): it trains the same selection without touching the base weights."
            )


def refuse_training_on_cpu_repacked_4bit(model: nn.Module) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer's weight for CPU inference at its first eval-mode forward without
    gradients on an AVX512-BF16 CPU, and a repacked layer no longer back-propagates to its input: training then would
    silently compute wrong gradients for every adapter (a LoRA's too). Refuse before such a step."""
    if _loaded("bitsandbytes") is None or torch.compiler.is_compiling():
        return
    for path, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False) and _is_bnb_4bit(module):
            raise RuntimeError(
                f"bitsandbytes repacked the 4-bit weight of '{path}' for CPU inference (an eval-mode forward without "
                "gradients on an AVX512-BF16 CPU); a repacked layer no longer passes gradients to its input, so this "
                "training step would compute wrong gradients. Save the adapter, reload the 4-bit base and the adapter "
                "(PeftModel.from_pretrained(..., is_trainable=True)), and train before evaluating in eval mode."
            )


def warn_rounding(fmt: QuantizedFormat, action: str) -> None:
    """What PEFT's LoRA says when it merges into a quantized weight; unmerging is exact here, merging is not."""
    warnings.warn(
        f"{action} an S2FT adapter into a {fmt.name} weight requantizes the whole weight, so outputs differ from the "
        "unmerged adapter by rounding errors. Unmerging puts the original quantized weight back exactly.",
        stacklevel=3,
    )


__all__ = [
    "DELTA_DTYPE",
    "FORMATS",
    "QuantizedFormat",
    "QuantizedWeight",
    "check_plain",
    "format_of",
    "is_quantized",
    "recipe_of",
    "refuse_permute",
    "refuse_training_on_cpu_repacked_4bit",
    "warn_rounding",
]
