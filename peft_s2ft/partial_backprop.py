"""A frozen linear layer plus dense deltas on a few of its columns (or rows), computed without writing the weight.

    y = x W^T + b + sum over column deltas of x[..., S] D^T + sum over row deltas of scatter_R(x D^T)

The base weight W is only ever read, so threads, FSDP shards and quantized weights can share it. For y = x W^T
with trainable columns S, backward needs x[..., S] and nothing else of x: grad_D = grad_y^T x[..., S] and
grad_x = grad_y W + scatter_S(grad_y D). This function saves exactly that (the whole input only for row deltas,
or when the user made W itself trainable) and never computes a gradient for a frozen weight.

A delta's positions are an index tensor (default mode) or a contiguous range (permute mode, where the
co-permutation made the block contiguous): a range is read as a view of x and accumulated straight into a view
of the output, with no gather or scatter.

A quantized base layer (quantized.py) has no float weight to pass: `BasePlusSparseDelta` calls the layer itself for
the frozen part and takes the input gradient `grad_y W` from a callable that dequantizes W, saving the same.
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
    return out, _add_deltas(out, x2, spec, deltas, indices, dtype)


def _add_deltas(out: torch.Tensor, x2: torch.Tensor, spec, deltas, indices, dtype) -> list:
    """Accumulate every delta's contribution into the 2-D output in place; per column delta, the input columns it
    read (None for row deltas)."""
    selected_inputs = []
    for (axis, where), index, delta in zip(spec, indices, deltas, strict=True):
        if axis == COLUMNS:
            selected = _columns(x2, where, index)
            out.addmm_(selected, delta.to(dtype).t())
            selected_inputs.append(selected)
        else:
            _add_product_to_columns(out, where, index, x2, delta.to(dtype).t())
            selected_inputs.append(None)
    return selected_inputs


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
            saved_inputs = _inputs_to_save(spec, selected_inputs, wants_delta_grad, x2)
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
            _add_delta_input_grads(grad_x, g, spec, indices, deltas, ctx.dtype)
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (g.t() @ inputs[-1]).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        grad_deltas = _delta_grads(g, spec, indices, deltas, saved_inputs)
        return (grad_x, grad_weight, grad_bias, None, *grad_deltas, *([None] * index_count))


def _inputs_to_save(spec, selected_inputs, wants_delta_grad, x2: torch.Tensor) -> list:
    """Per delta, what its gradient needs: the selected input columns (a copy, so a range's view does not keep all
    of x alive), the whole input for a row delta, nothing for a delta that needs no gradient."""
    saved = []
    for (axis, _), selected, wants_grad in zip(spec, selected_inputs, wants_delta_grad, strict=True):
        if not wants_grad:
            saved.append(None)
        else:
            saved.append(selected.contiguous() if axis == COLUMNS else x2)
    return saved


def _add_delta_input_grads(grad_x: torch.Tensor, g: torch.Tensor, spec, indices, deltas, dtype) -> None:
    """grad_x += the deltas' part of the input gradient, in place."""
    for (axis, where), index, delta in zip(spec, indices, deltas, strict=True):
        if axis == COLUMNS:
            _add_product_to_columns(grad_x, where, index, g, delta.to(dtype))
        else:
            grad_x.addmm_(_columns(g, where, index), delta.to(dtype))


def _delta_grads(g: torch.Tensor, spec, indices, deltas, saved_inputs) -> list:
    grads = []
    for (axis, where), index, delta, saved in zip(spec, indices, deltas, saved_inputs, strict=True):
        if saved is None:
            grads.append(None)
            continue
        grad_block_out = g if axis == COLUMNS else _columns(g, where, index)
        grads.append((grad_block_out.t() @ saved).to(delta.dtype))
    return grads


def _restore_saved(ctx, stored) -> tuple[list, list, list]:
    """(deltas, per-delta indices, per-delta saved inputs) from what `save_for_backward` kept."""
    spec, count = ctx.spec, len(ctx.spec)
    index_count = sum(where is None for _, where in spec)
    deltas, indices = stored[:count], _per_delta(spec, stored[count : count + index_count])
    saved_inputs: list[torch.Tensor | None] = [None] * count
    for slot, tensor in zip(ctx.input_slots, stored[count + index_count :], strict=False):
        saved_inputs[slot] = tensor
    return list(deltas), indices, saved_inputs


def base_plus_sparse_delta(x, base, input_grad, bias, spec, *tensors) -> torch.Tensor:
    """A layer whose frozen part is computed by `base` (a quantized layer's own forward) plus the deltas of `spec`.

    `input_grad(g)` returns `g W` for the layer's (dequantized) weight W. Where no gradient is needed this is
    `base(x)` plus the deltas' contributions as plain operations; otherwise `BasePlusSparseDelta`.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, *tensors)):
        return BasePlusSparseDelta.apply(x, base, input_grad, bias, spec, *tensors)
    out, _, _ = _base_plus_deltas(x, base, spec, tensors)
    return _unflatten(out, x.shape)


def _base_plus_deltas(x, base, spec, tensors) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The 2-D output of `base(x)` with the deltas added, the 2-D input in the output's dtype, the selected inputs."""
    count = len(spec)
    deltas, indices = tensors[:count], _per_delta(spec, tensors[count:])
    with torch.no_grad():
        out = base(x)
    # The quantized layer decides its output dtype (bitsandbytes returns the input's); the deltas follow it.
    dtype = out.dtype
    with torch.autocast(x.device.type, enabled=False) if _compute_dtype(x)[1] else contextlib.nullcontext():
        out2 = out.reshape(-1, out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        selected = _add_deltas(out2, x2, spec, deltas, indices, dtype)
    return out2, x2, selected


class BasePlusSparseDelta(torch.autograd.Function):
    """y = base(x) + every delta's contribution, for a base layer S2FT cannot express as F.linear with a float
    weight (a quantized one). Its own autograd is not used: bitsandbytes' 8-bit matmul keeps the whole input for
    backward and torchao's the dequantized weight. This saves only what the deltas' gradients need (x[..., S] for a
    column delta) and computes the input gradient with `input_grad`, which dequantizes the weight transiently.
    A trainable bias of the base layer gets its gradient; a trainable quantized weight cannot exist.
    """

    @staticmethod
    def forward(ctx, x, base, input_grad, bias, spec, *tensors):
        count = len(spec)
        out2, x2, selected_inputs = _base_plus_deltas(x, base, spec, tensors)
        saved_inputs = _inputs_to_save(spec, selected_inputs, ctx.needs_input_grad[5 : 5 + count], x2)
        ctx.spec, ctx.input_grad, ctx.x_shape, ctx.x_dtype, ctx.dtype = spec, input_grad, x.shape, x.dtype, out2.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.input_slots = [i for i, t in enumerate(saved_inputs) if t is not None]
        ctx.save_for_backward(*tensors, *(saved_inputs[i] for i in ctx.input_slots))
        return _unflatten(out2, x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        stored = ctx.saved_tensors  # once: non-reentrant checkpointing allows one unpack
        deltas, indices, saved_inputs = _restore_saved(ctx, stored)
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype)
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.input_grad(g)
            _add_delta_input_grads(grad_x, g, ctx.spec, indices, deltas, ctx.dtype)
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        grad_deltas = _delta_grads(g, ctx.spec, indices, deltas, saved_inputs)
        index_count = len(stored) - len(ctx.spec) - len(ctx.input_slots)
        return (grad_x, None, None, grad_bias, None, *grad_deltas, *([None] * index_count))


def _per_delta(spec, index_tensors) -> list[torch.Tensor | None]:
    """One entry per delta: its index tensor, or None for a delta at a contiguous range."""
    remaining = iter(index_tensors)
    return [next(remaining) if where is None else None for _, where in spec]
