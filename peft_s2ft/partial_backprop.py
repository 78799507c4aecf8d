"""Linear layers whose only trainable part is a few columns (or rows) of the weight.

For y = x W^T with trainable columns S, backward needs x[..., S] and nothing else of x:
grad_W[:, S] = grad_y^T x[..., S], grad_x = grad_y W. These functions save exactly that, and
never compute a gradient for the frozen weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLUMNS = "in"  # delta of shape (out, |S|) on input columns S
ROWS = "out"  # delta of shape (|S|, in) on output rows S


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class SparseDeltaLinear(torch.autograd.Function):
    """y = x (W + scatter(deltas))^T + b, with one dense matmul over W plus one small matmul per delta.

    `indices[i]` and `axes[i]` say where `deltas[i]` sits in W. Saved for backward: the selected
    input columns for column deltas (the full input only when a row delta needs it), W and the deltas
    (parameters: no new memory).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, indices, axes, *deltas):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            out = F.linear(x2, weight.to(dtype), None if bias is None else bias.to(dtype))
            saved_inputs = []
            needs_full_input = False
            for index, axis, delta in zip(indices, axes, deltas, strict=True):
                delta = delta.to(dtype)
                if axis == COLUMNS:
                    x_selected = x2.index_select(1, index)
                    out.addmm_(x_selected, delta.t())
                    saved_inputs.append(x_selected)
                else:
                    out.index_add_(1, index, x2 @ delta.t())
                    saved_inputs.append(None)
                    needs_full_input = True
        trains_delta = any(ctx.needs_input_grad[5:])
        ctx.axes, ctx.x_shape, ctx.dtype, ctx.has_bias = axes, x.shape, dtype, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.x_dtype = x.dtype
        ctx.column_slots = [i for i, s in enumerate(saved_inputs) if s is not None]
        to_save = [weight, *indices, *deltas]
        if trains_delta:
            to_save += [s for s in saved_inputs if s is not None]
            if needs_full_input:
                to_save.append(x2)
        ctx.trains_delta, ctx.needs_full_input = trains_delta, needs_full_input and trains_delta
        ctx.save_for_backward(*to_save)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        count = len(ctx.axes)
        weight, indices, deltas = saved[0], saved[1 : 1 + count], saved[1 + count : 1 + 2 * count]
        rest = saved[1 + 2 * count :]
        column_inputs = dict(
            zip(ctx.column_slots, rest, strict=False)
        )  # rest may end with the full input if ctx.trains_delta else {}
        x2 = rest[-1] if ctx.needs_full_input else None
        dtype = ctx.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)

        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight.to(dtype)
            for index, axis, delta in zip(indices, ctx.axes, deltas, strict=True):
                delta = delta.to(dtype)
                if axis == COLUMNS:
                    grad_x.index_add_(1, index, g @ delta)
                else:
                    grad_x.addmm_(g.index_select(1, index), delta)
            grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)

        grad_deltas = []
        for slot, (index, axis, delta) in enumerate(zip(indices, ctx.axes, deltas, strict=True)):
            if not ctx.needs_input_grad[5 + slot]:
                grad_deltas.append(None)
            elif axis == COLUMNS:
                grad_deltas.append((g.t() @ column_inputs[slot]).to(delta.dtype))
            else:
                grad_deltas.append((g.index_select(1, index).t() @ x2).to(delta.dtype))
        return (grad_x, None, grad_bias, None, None, *grad_deltas)


class MergedBlockLinear(torch.autograd.Function):
    """y = x W^T + b where W already holds the trained block at [start, stop) along `axis`.

    This is the co-permuted layout: one dense matmul. For a column block backward saves only
    x[..., start:stop]; a row block needs the whole input. d W_block / d delta is the identity, so the
    block's gradient is returned as the delta's.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, start, stop, axis, delta):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
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
        return out.reshape(*x.shape[:-1], out.shape[-1])

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
