"""Measuring one training step (forward, backward, AdamW step) of a `Trainee`.

Deterministic figures come from one instrumented step: bytes saved for backward, FLOPs and peak memory.
Wall time comes from plain, uninstrumented steps, timed per phase.

Peak memory is the peak of bytes held by tensors, the CPU analogue of `torch.cuda.max_memory_allocated`:
what the method keeps resident (weights, buffers, optimizer state) plus the largest rise in allocated
bytes during the step. On the CPU the rise is read from the profiler's allocation events, which carry the
allocator's running total. Process RSS is not used: glibc keeps freed heap pages mapped, so in a process
that interleaves methods the RSS left by one method's step hides the next one's.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .methods import Trainee


@dataclass
class StepFigures:
    """Deterministic figures of one step; `saved_param_bytes` is the part of `saved_bytes` that is weights."""

    saved_bytes: int
    saved_param_bytes: int
    flops: int
    resident_bytes: int
    peak_step_bytes: int

    @property
    def peak_mem_bytes(self) -> int:
        return self.resident_bytes + self.peak_step_bytes


@dataclass
class StepTimes:
    """Wall time per phase, and the process's CPU time for the whole step.

    CPU time leaves out the time other processes hold the cores, so on a shared machine it is the steadier
    figure; with several threads it also counts threads that wait busily.
    """

    forward_s: float
    backward_s: float
    optimizer_s: float
    cpu_s: float

    @property
    def step_s(self) -> float:
        return self.forward_s + self.backward_s + self.optimizer_s


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _inplace_addmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of `_grouped_mm(a, b, offs)`: one matmul per group, the groups splitting the rows of a 2-D `a` (the
    experts' forward and input gradient), the contracted dimension of two 2-D operands (the experts' weight
    gradient), the columns of a 2-D `b`, or none (3-D x 3-D, a batched matmul)."""
    if len(a_shape) == 2 and len(b_shape) == 2:  # [M, S] x [S, N] -> [G, M, N]
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 2:  # [S, K] x [G, K, N] -> [S, N]
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(b_shape) == 2:  # [G, M, K] x [K, S] -> [M, S]
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]  # [G, M, K] x [G, K, N]


# torch's FLOP counter knows the CUDA attention kernels but not the CPU one, so attention would count as 0
# on the CPU; these use torch's own SDPA formulas (full, non-causal matrices, as on CUDA). It also counts
# `addmm` but not the in-place `addmm_` with which S2FT accumulates its deltas' products into the output, nor
# `_grouped_mm`, the kernel of transformers' fused experts (MoE models), whose matmuls would count as 0.
EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
    torch.ops.aten.addmm_: _inplace_addmm_flops,
    torch.ops.aten._grouped_mm: _grouped_mm_flops,
}


def _storage_key(tensor: torch.Tensor) -> tuple[str, int, int] | None:
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested, ...)
        return None
    return (str(tensor.device), storage.data_ptr(), storage.nbytes())


class SavedTensorCounter:
    """Adds up the distinct storages packed for backward while it is active.

    A storage is what stays alive, so a saved view of a larger tensor counts the whole storage.
    """

    def __init__(self) -> None:
        self._storages: dict[tuple[str, int], int] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key is not None:
            self._storages[key[:2]] = key[2]
        return tensor

    @contextmanager
    def counting(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield

    def total(self, among: set[tuple[str, int]] | None = None) -> int:
        return sum(n for key, n in self._storages.items() if among is None or key in among)


def _state_tensors(trainee: Trainee) -> Iterator[torch.Tensor]:
    yield from trainee.model.parameters()
    yield from trainee.model.buffers()
    for p in trainee.model.parameters():
        if p.grad is not None:
            yield p.grad
    if trainee.optimizer is not None:
        for state in trainee.optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def _distinct_storages(tensors: Iterator[torch.Tensor]) -> dict[tuple[str, int], int]:
    found = {}
    for tensor in tensors:
        key = _storage_key(tensor)
        if key is not None:
            found[key[:2]] = key[2]
    return found


def resident_bytes(trainee: Trainee) -> int:
    """Bytes of the distinct storages a trainee holds between steps: weights, buffers, optimizer state."""
    return sum(_distinct_storages(_state_tensors(trainee)).values())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(trainee: Trainee, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    if trainee.feed == "ids":
        return {"input_ids": ids}
    embeds = trainee.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    return {"inputs_embeds": embeds}


def _forward(trainee: Trainee, ids: torch.Tensor) -> torch.Tensor:
    if trainee.optimizer is not None:
        trainee.optimizer.zero_grad(set_to_none=True)
    return trainee.model(**_inputs(trainee, ids), labels=trainee.labels(ids), use_cache=False).loss


def _update(trainee: Trainee) -> None:
    if trainee.optimizer is not None:
        trainee.optimizer.step()


def timed_step(trainee: Trainee, ids: torch.Tensor) -> StepTimes:
    """Run one training step and time its three phases."""
    device = ids.device
    _synchronize(device)
    cpu_start, start = time.process_time(), time.perf_counter()
    loss = _forward(trainee, ids)
    _synchronize(device)
    forward_end = time.perf_counter()
    loss.backward()
    _synchronize(device)
    backward_end = time.perf_counter()
    _update(trainee)
    _synchronize(device)
    end, cpu_end = time.perf_counter(), time.process_time()
    return StepTimes(forward_end - start, backward_end - forward_end, end - backward_end, cpu_end - cpu_start)


def _cpu_allocation_events(prof) -> list[tuple[int, int, int]]:
    """(time, size, allocator total after it) of every CPU allocation and free the profiler saw."""
    from torch._C._profiler import _EventType

    found = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        fields = event.extra_fields
        if event.tag == _EventType.Allocation and fields.device.type == "cpu":
            found.append((event.start_time_ns, fields.alloc_size, fields.total_allocated))
    return sorted(found)


@contextmanager
def _peak_rise(device: torch.device, result: list[int]) -> Iterator[None]:
    """Append to `result` the largest rise of allocated tensor bytes on `device` inside the block."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        result.append(torch.cuda.max_memory_allocated(device) - before)
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield
    events = _cpu_allocation_events(prof)
    if not events:
        result.append(0)
        return
    _, first_size, first_total = events[0]
    before = first_total - first_size
    result.append(max(total for _, _, total in events) - before)


def instrumented_step(trainee: Trainee, ids: torch.Tensor) -> StepFigures:
    """Run one training step under the saved-tensor hooks, the FLOP counter and the memory tracker.

    Call it in a steady state (optimizer state already created), as every timed step is.
    """
    if trainee.optimizer is not None:
        trainee.optimizer.zero_grad(set_to_none=True)
    weights = _distinct_storages(iter([*trainee.model.parameters(), *trainee.model.buffers()]))
    resident = resident_bytes(trainee)
    saved = SavedTensorCounter()
    peak: list[int] = []
    flop_counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
    with _peak_rise(ids.device, peak):
        with flop_counter:
            with saved.counting():
                loss = _forward(trainee, ids)
            loss.backward()
        _update(trainee)
        del loss
    return StepFigures(
        saved_bytes=saved.total(),
        saved_param_bytes=saved.total(among=set(weights)),
        flops=flop_counter.get_total_flops(),
        resident_bytes=resident,
        peak_step_bytes=peak[0],
    )


def adapter_file_bytes(trainee: Trainee) -> int:
    """What a method ships: the adapter file for PEFT methods, the whole weights for full fine-tuning."""
    if trainee.method in ("limit", "qlimit"):
        return 0
    if trainee.method == "full":
        return sum(_distinct_storages(iter(trainee.model.parameters())).values())
    with tempfile.TemporaryDirectory() as folder:
        trainee.model.save_pretrained(folder)
        return (Path(folder) / "adapter_model.safetensors").stat().st_size
