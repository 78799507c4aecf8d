"""Partial back-propagation: the gradients of plain autograd, with only the selected columns saved."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peft_s2ft.layer import S2FTLayer
from peft_s2ft.partial_backprop import COLUMNS, ROWS, SparseDeltaLinear


def _saved_bytes(fn) -> tuple[int, object]:
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def _layer(axis: str, bias: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    base = nn.Linear(24, 16, bias=bias).requires_grad_(False)
    count = 5
    limit = 24 if axis == COLUMNS else 16
    indices = torch.randperm(limit)[:count]
    layer = S2FTLayer(base, "default", axis, indices, init_weights=False)
    return base, layer, indices


@pytest.mark.parametrize("axis", [COLUMNS, ROWS])
def test_gradients_match_plain_autograd_on_the_dense_block(axis):
    base, layer, indices = _layer(axis)
    delta = layer.s2ft_delta["default"]
    x = torch.randn(3, 7, 24, requires_grad=True)
    grad_out = torch.randn(3, 7, 16)

    (layer(x) * grad_out).sum().backward()
    ours_x, ours_delta = x.grad.clone(), delta.grad.clone()

    x.grad = None
    reference_delta = delta.detach().clone().requires_grad_(True)
    dim = 1 if axis == COLUMNS else 0
    weight = base.weight.index_add(dim, indices, reference_delta)
    (F.linear(x, weight, base.bias) * grad_out).sum().backward()
    torch.testing.assert_close(ours_x, x.grad)
    torch.testing.assert_close(ours_delta, reference_delta.grad)


def test_column_layer_saves_only_the_selected_input_columns():
    base, layer, indices = _layer(COLUMNS, bias=False)
    x = torch.randn(4, 32, 24, requires_grad=True)
    frozen_bytes, _ = _saved_bytes(lambda: base(x))
    ours_bytes, out = _saved_bytes(lambda: layer(x))
    weight_bytes = base.weight.numel() * 4
    delta_bytes = layer.s2ft_delta["default"].numel() * 4
    index_bytes = indices.numel() * 8
    selected_input_bytes = 4 * 32 * len(indices) * 4
    assert frozen_bytes == weight_bytes  # a frozen linear saves its weight, not its input
    assert ours_bytes == weight_bytes + delta_bytes + index_bytes + selected_input_bytes
    assert ours_bytes - frozen_bytes < x.numel() * 4 / 2  # far less than the full input LoRA keeps
    out.sum().backward()


def test_no_input_is_saved_when_nothing_trains():
    base, layer, _ = _layer(COLUMNS, bias=False)
    layer.requires_grad_(False)
    x = torch.randn(4, 32, 24, requires_grad=True)
    frozen_bytes, _ = _saved_bytes(lambda: base(x))
    ours_bytes, _ = _saved_bytes(lambda: layer(x))
    assert ours_bytes - frozen_bytes == layer.s2ft_delta["default"].numel() * 4 + 5 * 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_with_fp32_delta(dtype):
    base, layer, indices = _layer(COLUMNS)
    layer.to(dtype)
    layer.s2ft_delta["default"].data = layer.s2ft_delta["default"].data.float()
    x = torch.randn(2, 3, 24, dtype=dtype, requires_grad=True)
    out = layer(x)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert layer.s2ft_delta["default"].grad.dtype == torch.float32
    assert x.grad.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_half_precision(dtype):
    base, layer, indices = _layer(COLUMNS)
    x = torch.randn(2, 3, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x)
        expected = base(x)  # autocast's own result for the frozen layer, with the delta added below
    assert out.dtype == dtype
    out.float().sum().backward()
    assert layer.s2ft_delta["default"].grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert layer.s2ft_delta["default"].grad.abs().sum() > 0
    delta_part = x.detach()[..., indices] @ layer.s2ft_delta["default"].detach().t()
    torch.testing.assert_close(out.float(), expected.float() + delta_part, atol=0.05, rtol=0.02)


def test_trainable_bias_gets_its_gradient_in_its_own_dtype_under_autocast():
    base, layer, _ = _layer(COLUMNS)
    base.bias.requires_grad_(True)
    x = torch.randn(2, 3, 24)
    weights = torch.randn(2, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    # The function's own return value: autograd's engine would cast a wrongly typed gradient silently.
    raw_grads = out.grad_fn.apply(weights.to(out.dtype))
    assert raw_grads[2].dtype == torch.float32
    (out.float() * weights).sum().backward()
    expected = weights.to(torch.bfloat16).reshape(-1, 16).sum(0).float()
    torch.testing.assert_close(base.bias.grad, expected, atol=0.05, rtol=0.02)


def test_output_can_be_modified_in_place_like_a_plain_linear():
    base, layer, indices = _layer(COLUMNS)
    x = torch.randn(2, 3, 24, requires_grad=True)
    out = layer(x)
    out += 1.0  # e.g. a residual added in place
    (out * out).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    delta_ref = layer.s2ft_delta["default"].detach().clone().requires_grad_(True)
    ref = F.linear(x_ref, base.weight.index_add(1, indices, delta_ref), base.bias) + 1.0
    (ref * ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.s2ft_delta["default"].grad, delta_ref.grad)

    # permute mode's layout too: the block at a contiguous range
    block_out = SparseDeltaLinear.apply(x, base.weight, base.bias, ((COLUMNS, (0, 5)),), delta_ref)
    block_out += 1.0
    block_out.sum().backward()


def test_in_and_out_features():
    base, layer, _ = _layer(COLUMNS)
    assert (layer.in_features, layer.out_features) == (24, 16)


def test_rejects_bad_indices():
    base = nn.Linear(24, 16)
    with pytest.raises(ValueError, match="range"):
        S2FTLayer(base, "default", COLUMNS, torch.tensor([3, 24]))
    with pytest.raises(ValueError, match="duplicates"):
        S2FTLayer(base, "default", COLUMNS, torch.tensor([3, 3]))


def test_base_weight_is_restored_bit_for_bit_even_when_the_matmul_fails():
    base, layer, _ = _layer(COLUMNS)
    original = base.weight.detach().clone()
    x = torch.randn(3, 24, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(base.weight, original)
    with pytest.raises(RuntimeError):
        layer(torch.randn(3, 23))  # wrong width: F.linear raises inside the merged-weight window
    assert torch.equal(base.weight, original)
