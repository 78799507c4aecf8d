"""Linear layers whose only trainable part is a few columns (or rows) of the weight.

For y = x W^T with trainable columns S, backward needs x[..., S] and nothing else of x:
grad_W[:, S] = grad_y^T x[..., S], grad_x = grad_y W. These functions save exactly that, and
never compute a gradient for the frozen weight.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

COLUMNS = "in"  # delta of shape (out, |S|) on input columns S
ROWS = "out"  # delta of shape (|S|, in) on output rows S


def _compute_dtype(x: torch.Tensor) -> tuple[torch.dtype, bool]:
    """The dtype to compute in, and whether autocast chose it (and must be switched off around our casts)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type), True
    return x.dtype, False


def _dim(axis: str) -> int:
    return 1 if axis == COLUMNS else 0


def _unflatten(out: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """The 2-D result in the input's leading shape, as a tensor of its own rather than a view.

    A view made inside a custom Function cannot be modified in place afterwards, which a plain nn.Linear's
    output can (`y += residual`); `_unsafe_view` is what torch's own matmul uses for the same reshape.
    """
    return torch.ops.aten._unsafe_view(out, (*x_shape[:-1], out.shape[-1]))


def _merged_matmul(
    a: torch.Tensor, weight: torch.Tensor, indices, axes, deltas, dtype: torch.dtype, bias=None, *, forward: bool
):
    """F.linear(a, W + scatter(deltas), bias) (forward) or a @ (W + scatter(deltas)) (backward).

    A skinny extra matmul per delta (x[..., S] delta^T) costs as much as a tenth of the main one on a CPU
    (its output is as large as the layer's), while adding |S| columns into W for one matmul and putting the
    saved originals back costs next to nothing. The originals are restored by copy, not by subtraction, so
    the base weight is bit for bit unchanged afterwards. `.data` keeps autograd's version counter out of it.
    Plain functions rather than a context manager: this runs twice per adapted layer and step.
    """
    if weight.dtype != dtype:  # autocast or a half-precision compute: the cast is a fresh copy anyway
        merged = weight.to(dtype)
        for index, axis, delta in zip(indices, axes, deltas, strict=True):
            merged.index_add_(_dim(axis), index, delta.to(dtype))
        return F.linear(a, merged, bias) if forward else a @ merged
    data = weight.data
    originals = [data.index_select(_dim(axis), index) for index, axis in zip(indices, axes, strict=True)]
    try:
        for index, axis, delta in zip(indices, axes, deltas, strict=True):
            data.index_add_(_dim(axis), index, delta.detach().to(dtype))
        return F.linear(a, data, bias) if forward else a @ data
    finally:
        for index, axis, original in zip(indices, axes, originals, strict=True):
            data.index_copy_(_dim(axis), index, original)


class SparseDeltaLinear(torch.autograd.Function):
    """y = x (W + scatter(deltas))^T + b as one dense matmul over the temporarily merged weight.

    `indices[i]` and `axes[i]` say where `deltas[i]` sits in W. Saved for backward: the selected
    input columns for column deltas (the full input only when a row delta needs it), W and the deltas
    (parameters: no new memory).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, indices, axes, *deltas):
        dtype, autocast = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            # .to() returns the tensor itself when it already has the dtype: no copy on the fp32 path.
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            compute_bias = None if bias is None else bias.to(dtype)
            out = _merged_matmul(x2, weight, indices, axes, deltas, dtype, compute_bias, forward=True)
        trains_delta = any(ctx.needs_input_grad[5:])
        ctx.axes, ctx.x_shape, ctx.x_dtype, ctx.dtype = axes, x.shape, x.dtype, dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.trains_delta = trains_delta
        saved_inputs = []
        if trains_delta:
            # Column deltas need only their columns of the input; row deltas need all of it.
            saved_inputs = [x2.index_select(1, i) if a == COLUMNS else x2 for i, a in zip(indices, axes, strict=True)]
        ctx.save_for_backward(weight, *indices, *deltas, *saved_inputs)
        return _unflatten(out, x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        count = len(ctx.axes)
        weight, *rest = ctx.saved_tensors
        indices, deltas, saved_inputs = rest[:count], rest[count : 2 * count], rest[2 * count :]
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype)

        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _merged_matmul(g, weight, indices, ctx.axes, deltas, ctx.dtype, forward=False)
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)

        grad_deltas = []
        for slot, (index, axis, delta) in enumerate(zip(indices, ctx.axes, deltas, strict=True)):
            if not ctx.needs_input_grad[5 + slot]:
                grad_deltas.append(None)
                continue
            grad_block_out = g if axis == COLUMNS else g.index_select(1, index)
            grad_deltas.append((grad_block_out.t() @ saved_inputs[slot]).to(delta.dtype))
        return (grad_x, None, grad_bias, None, None, *grad_deltas)


class MergedBlockLinear(torch.autograd.Function):
    """y = x W^T + b where W already holds the trained block at [start, stop) along `axis`.

    This is the co-permuted layout: one dense matmul. For a column block backward saves only
    x[..., start:stop]; a row block needs the whole input. d W_block / d delta is the identity, so the
    block's gradient is returned as the delta's.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, start, stop, axis, delta):
        dtype, autocast = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            out = F.linear(x2, weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.x_shape, ctx.dtype, ctx.x_dtype, ctx.has_bias = x.shape, dtype, x.dtype, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.block, ctx.axis = (start, stop), axis
        ctx.trains_delta = ctx.needs_input_grad[6]
        saved_input = []
        if ctx.trains_delta:
            saved_input = [x2[:, start:stop].contiguous() if axis == COLUMNS else x2]
        ctx.save_for_backward(weight, delta, *saved_input)
        return _unflatten(out, x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        weight, delta, *saved_input = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype)
        grad_x = grad_bias = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.to(ctx.dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        if ctx.trains_delta:
            start, stop = ctx.block
            grad_block_out = g if ctx.axis == COLUMNS else g[:, start:stop]
            grad_delta = (grad_block_out.t() @ saved_input[0]).to(delta.dtype)
        return grad_x, None, grad_bias, None, None, None, grad_delta
