"""One adapted layer's forward + backward, for each way of computing x (W + delta)^T, side by side.

The library computes the frozen matmul plus the delta's contribution and never writes W (`s2ft`, and
`s2ft-range` for permute mode's contiguous block). The other variants are references, measured so that the
choice is a measured one: `merged-copy` builds W + delta as a new tensor per call (safe, but a weight-sized
temporary), `in-place-merge` is the formulation the library used before it stopped writing W (unsafe with
threads, sharded or quantized weights: here only for comparison), and `split` splits the matmul at a contiguous
block so that the block costs no extra FLOPs. `frozen` is a frozen linear with the input's gradient: what the
layer costs in the limit. Variants run interleaved; medians are reported as milliseconds over `frozen`.

    python benchmarks/forward_variants.py --repeats 100 --output forward_variants.json
    python benchmarks/forward_variants.py --shapes 1b-down --repeats 20   # a 64 MB weight
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from peft_s2ft.partial_backprop import COLUMNS, SparseDeltaLinear

# (in_features, out_features, trained columns): SmolLM2-135M's output and down projections (one head, 39 of 1536
# channels), a Llama-3.2-1B-like output projection with two heads, and its down projection (80 of 8192 channels).
SHAPES = {"smollm2-o": (576, 576, 64), "smollm2-down": (1536, 576, 39), "1b-o": (2048, 2048, 128)}
LARGE = {"1b-down": (8192, 2048, 80)}


class _MergedCopy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, index, delta):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(weight, index, delta, x2.index_select(1, index))
        ctx.x_shape = x.shape
        return F.linear(x2, weight.index_add(1, index, delta)).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        weight, index, delta, selected = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        return (g @ weight.index_add(1, index, delta)).view(ctx.x_shape), None, None, g.t() @ selected


class _InPlaceMerge(torch.autograd.Function):
    """Adds the delta into W's columns for each matmul and copies them back (not thread-safe)."""

    @staticmethod
    def _merged_matmul(a, weight, index, delta, forward):
        data = weight.data
        original = data.index_select(1, index)
        data.index_add_(1, index, delta.detach())
        try:
            return F.linear(a, data) if forward else a @ data
        finally:
            data.index_copy_(1, index, original)

    @staticmethod
    def forward(ctx, x, weight, index, delta):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(weight, index, delta, x2.index_select(1, index))
        ctx.x_shape = x.shape
        return _InPlaceMerge._merged_matmul(x2, weight, index, delta, True).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        weight, index, delta, selected = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = _InPlaceMerge._merged_matmul(g, weight, index, delta, False)
        return grad_x.view(ctx.x_shape), None, None, g.t() @ selected


class _Split(torch.autograd.Function):
    """y = x[:, k:] W[:, k:]^T + x[:, :k] (W[:, :k] + D)^T for a block at the front: no extra FLOPs."""

    @staticmethod
    def forward(ctx, x, weight, k, delta):
        x2 = x.reshape(-1, x.shape[-1])
        out = F.linear(x2[:, k:], weight[:, k:])
        out.addmm_(x2[:, :k], (weight[:, :k] + delta).t())
        ctx.save_for_backward(weight, delta, x2[:, :k].contiguous())
        ctx.x_shape, ctx.k = x.shape, k
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        weight, delta, selected = ctx.saved_tensors
        k, g = ctx.k, grad.reshape(-1, grad.shape[-1])
        grad_x = g.new_empty(g.shape[0], weight.shape[1])
        grad_x[:, k:].addmm_(g, weight[:, k:], beta=0)
        grad_x[:, :k].addmm_(g, weight[:, :k] + delta, beta=0)
        return grad_x.view(ctx.x_shape), None, None, g.t() @ selected


def variants(weight, index, k, delta):
    return {
        "frozen": lambda x: F.linear(x, weight),
        "s2ft": lambda x: SparseDeltaLinear.apply(x, weight, None, ((COLUMNS, None),), delta, index),
        "s2ft-range": lambda x: SparseDeltaLinear.apply(x, weight, None, ((COLUMNS, (0, k)),), delta),
        "merged-copy": lambda x: _MergedCopy.apply(x, weight, index, delta),
        "in-place-merge": lambda x: _InPlaceMerge.apply(x, weight, index, delta),
        "split": lambda x: _Split.apply(x, weight, k, delta),
    }


def measure(shape, tokens: int, repeats: int, warmup: int = 5) -> dict[str, float]:
    in_features, out_features, k = shape
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.02
    index = torch.randperm(in_features, generator=generator)[:k].sort().values
    delta = (torch.randn(out_features, k, generator=generator) * 0.01).requires_grad_(True)
    x = torch.randn(tokens, in_features, generator=generator)
    functions = variants(weight, index, k, delta)
    times: dict[str, list[float]] = {name: [] for name in functions}
    for repeat in range(warmup + repeats):
        for name, function in functions.items():  # interleaved: every variant sees the same machine state
            inputs = x.detach().requires_grad_(True)
            start = time.perf_counter()
            out = function(inputs)
            out.backward(torch.ones_like(out))
            if repeat >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024, help="Rows of the input (batch x sequence).")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"Comma list of {', '.join({**SHAPES, **LARGE})}.")
    parser.add_argument("--output", help="Write the records to this JSON file.")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = []
    names = [name for name in variants(None, None, 0, None) if name != "frozen"]
    print("| in x out, trained columns | frozen ms | " + " | ".join(f"{name} +ms" for name in names) + " |")
    for shape in ({**SHAPES, **LARGE}[name.strip()] for name in args.shapes.split(",")):
        medians = measure(shape, args.tokens, args.repeats)
        extra = {name: value - medians["frozen"] for name, value in medians.items() if name != "frozen"}
        records.append({"shape": shape, "tokens": args.tokens, "threads": args.threads, "median_ms": medians})
        cells = " | ".join(f"{value:+.2f}" for value in extra.values())
        print(f"| {shape[0]} x {shape[1]}, {shape[2]} | {medians['frozen']:.2f} | {cells} |", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(records, indent=2))
    return records


if __name__ == "__main__":
    main()
