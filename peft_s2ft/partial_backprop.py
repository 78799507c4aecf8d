"""A frozen linear layer plus dense deltas on a few of its columns (or rows), computed without writing the weight.

    y = x W^T + b + sum over column deltas of x[..., S] D^T + sum over row deltas of scatter_R(x D^T)

The base weight W is only ever read, so threads, FSDP shards and quantized weights can share it. For y = x W^T
with trainable columns S, backward needs x[..., S] and nothing else of x: grad_D = grad_y^T x[..., S] and
grad_x = grad_y W + scatter_S(grad_y D). This function saves exactly that (the whole input only for row deltas,
or when the user made W itself trainable) and never computes a gradient for a frozen weight.

A delta's positions are an index tensor (default mode) or a contiguous range (permute mode, where the
co-permutation made the block contiguous): a range is read as a view of x and accumulated straight into a view
of the output, with no gather or scatter.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

COLUMNS = "in"  # delta of shape (out, |S|) on input columns S
ROWS = "out"  # delta of shape (|S|, in) on output rows S

# Where a delta sits along its axis: `None` means "at the positions of an index tensor passed alongside";
# `(start, stop)` means the contiguous range [start, stop) of a co-permuted weight.
Range = tuple[int, int] | None


def _compute_dtype(x: torch.Tensor) -> tuple[torch.dtype, bool]:
    """The dtype to compute in, and whether autocast chose it (and must be switched off around our casts)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type), True
    return x.dtype, False


def _unflatten(out: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """The 2-D result in the input's leading shape, as a tensor of its own rather than a view.

    A view made inside a custom Function cannot be modified in place afterwards, which a plain nn.Linear's
    output can (`y += residual`); `_unsafe_view` is what torch's own matmul uses for the same reshape.
    """
    return torch.ops.aten._unsafe_view(out, (*x_shape[:-1], out.shape[-1]))


def _columns(matrix: torch.Tensor, where: Range, index: torch.Tensor | None) -> torch.Tensor:
    """matrix[:, positions]: a view for a range, a gathered copy for an index tensor."""
    if where is not None:
        return matrix[:, where[0] : where[1]]
    return matrix.index_select(1, index)


def _add_product_to_columns(out: torch.Tensor, where: Range, index, a: torch.Tensor, b: torch.Tensor) -> None:
    """out[:, positions] += a @ b in place; a range lets BLAS accumulate straight into the output."""
    if where is not None:
        out[:, where[0] : where[1]].addmm_(a, b)
    else:
        out.index_add_(1, index, a @ b)


def _delta_linear(x2: torch.Tensor, weight, bias, spec, deltas, indices, dtype) -> tuple[torch.Tensor, list]:
    """The 2-D output and, per column delta, the input columns it read (None for row deltas)."""
    out = F.linear(x2, weight.to(dtype), None if bias is None else bias.to(dtype))
    selected_inputs = []
    for (axis, where), index, delta in zip(spec, indices, deltas, strict=True):
        if axis == COLUMNS:
            selected = _columns(x2, where, index)
            out.addmm_(selected, delta.to(dtype).t())
            selected_inputs.append(selected)
        else:
            _add_product_to_columns(out, where, index, x2, delta.to(dtype).t())
            selected_inputs.append(None)
    return out, selected_inputs


def sparse_delta_linear(x, weight, bias, spec, *tensors) -> torch.Tensor:
    """`SparseDeltaLinear` where a gradient is needed; the same computation as plain operations where none is
    (serving: no_grad, inference mode, frozen adapters), which also keeps `torch.compile(fullgraph=True)` to one
    graph there (dynamo mis-binds a custom Function's non-tensor argument before *args when nothing needs a
    gradient)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, *tensors)):
        return SparseDeltaLinear.apply(x, weight, bias, spec, *tensors)
    count = len(spec)
    dtype, autocast = _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        deltas, indices = tensors[:count], _per_delta(spec, tensors[count:])
        out, _ = _delta_linear(x2, weight, bias, spec, deltas, indices, dtype)
    return _unflatten(out, x.shape)


class SparseDeltaLinear(torch.autograd.Function):
    """y = F.linear(x, W, b) plus every delta's contribution; W is read, never written.

    `spec[i] = (axis, where)` places `deltas[i]` on input columns (COLUMNS) or output rows (ROWS) of W, at the
    contiguous range `where`, or, when `where` is None, at the next of the index tensors passed after the deltas.
    `spec` is a tuple of constants, so torch.compile traces one graph per layout.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, spec, *tensors):
        count = len(spec)
        deltas, indices = tensors[:count], _per_delta(spec, tensors[count:])
        dtype, autocast = _compute_dtype(x)
        wants_delta_grad = ctx.needs_input_grad[4 : 4 + count]
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            # .to() returns the tensor itself when it already has the dtype: no copy on the common path.
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            out, selected_inputs = _delta_linear(x2, weight, bias, spec, deltas, indices, dtype)
            saved_inputs = []
            for (axis, _), selected, wants_grad in zip(spec, selected_inputs, wants_delta_grad, strict=True):
                if not wants_grad:
                    saved_inputs.append(None)
                elif axis == COLUMNS:
                    # A range is a view of x: keep a copy of just those columns, not all of x alive.
                    saved_inputs.append(selected.contiguous())
                else:
                    saved_inputs.append(x2)
        ctx.spec, ctx.x_shape, ctx.x_dtype, ctx.dtype = spec, x.shape, x.dtype, dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.input_slots = [i for i, t in enumerate(saved_inputs) if t is not None]
        full_input = [x2] if ctx.needs_input_grad[1] else []  # a trainable base weight needs all of x, saved last
        ctx.save_for_backward(weight, *tensors, *(saved_inputs[i] for i in ctx.input_slots), *full_input)
        return _unflatten(out, x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        spec, count = ctx.spec, len(ctx.spec)
        weight, *rest = ctx.saved_tensors
        index_count = sum(where is None for _, where in spec)
        deltas, indices = rest[:count], _per_delta(spec, rest[count : count + index_count])
        inputs = rest[count + index_count :]
        saved_inputs: list[torch.Tensor | None] = [None] * count
        for slot, tensor in zip(ctx.input_slots, inputs, strict=False):
            saved_inputs[slot] = tensor
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype)

        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight.to(ctx.dtype)
            for (axis, where), index, delta in zip(spec, indices, deltas, strict=True):
                if axis == COLUMNS:
                    _add_product_to_columns(grad_x, where, index, g, delta.to(ctx.dtype))
                else:
                    grad_x.addmm_(_columns(g, where, index), delta.to(ctx.dtype))
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (g.t() @ inputs[-1]).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)

        grad_deltas = []
        for (axis, where), index, delta, saved in zip(spec, indices, deltas, saved_inputs, strict=True):
            if saved is None:
                grad_deltas.append(None)
                continue
            grad_block_out = g if axis == COLUMNS else _columns(g, where, index)
            grad_deltas.append((grad_block_out.t() @ saved).to(delta.dtype))
        return (grad_x, grad_weight, grad_bias, None, *grad_deltas, *([None] * index_count))


def _per_delta(spec, index_tensors) -> list[torch.Tensor | None]:
    """One entry per delta: its index tensor, or None for a delta at a contiguous range."""
    remaining = iter(index_tensors)
    return [next(remaining) if where is None else None for _, where in spec]
