"""S2FT for mixture-of-experts layers: a dense delta on a few FFN channels of every expert.

transformers 5 stores the experts of a MoE layer as fused 3-D parameters of one module (`MixtralExperts`,
`GptOssExperts`, `Llama4TextExperts`, ...). The S2FT unit there is (expert e, channel c): channel c of expert e
is produced by rows c and I + c of `gate_up_proj[e]` (2c and 2c + 1 where interleaved, columns where stored
transposed) and consumed by column c of `down_proj[e]` (row c where transposed). An adapter trains, for every
expert, the down-projection inputs of k selected channels S_e:

    expert_e(x) = down_e(h) + D_e h[S_e],     h = act(gate_e x) * up_e x,     D_e of shape [H, k]

so `s2ft_delta[name]` is one [E, H, k] parameter and `s2ft_indices[name]` an [E, k] index buffer (original
channel numbers, per expert). The base module runs unchanged, with whatever kernel `config._experts_implementation`
selects; `ExpertsChannelDelta` adds the extra term. It never writes the base weights and saves for backward only
what is k-wide per routed token (the selected gate/up pre-activations), besides tensors that exist anyway (the
frozen weights, the routing weights and indices).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.autograd.function import once_differentiable

from . import quantized
from .layer import S2FTTunerLayer
from .mixed_batch import GROUPS_KWARG, RowGroups, current_groups
from .partial_backprop import _compute_dtype

ROUTED = "routed"  # forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]
PER_EXPERT = "per_expert"  # forward(hidden [E * T, H]) -> [E * T, H]: block e is expert e's (pre-scaled) input


@dataclass(frozen=True)
class ExpertsLayout:
    """How an experts module stores its fused weights and how it is called.

    transposed: weights are stored (in, out): gate_up_proj [E, H, 2I], down_proj [E, I, H]; otherwise (out, in):
        gate_up_proj [E, 2I, H], down_proj [E, H, I].
    interleaved: gate and up of channel c sit at 2c and 2c + 1 (GPT-OSS); otherwise at c and I + c.
    has_bias: `gate_up_proj_bias` [E, 2I] and `down_proj_bias` [E, H] exist.
    convention: ROUTED (the `use_experts_implementation` modules) or PER_EXPERT (Llama4: the MoE block repeats the
        tokens once per expert, scales them by the router score, and the experts module runs every expert densely).
    """

    transposed: bool
    interleaved: bool
    has_bias: bool
    convention: str = ROUTED

    @classmethod
    def from_module(cls, experts: nn.Module) -> ExpertsLayout:
        kind = f"{type(experts).__module__}.{type(experts).__qualname__}"
        if isinstance(experts, BaseTunerLayer):
            raise TypeError(f"S2FT cannot wrap an experts module that is already a PEFT tuner layer ({kind}).")
        if _is_llama4_experts(experts):
            layout = cls(transposed=True, interleaved=False, has_bias=False, convention=PER_EXPERT)
        else:
            flags = ("is_transposed", "is_concatenated", "has_bias")
            missing = [flag for flag in flags if not isinstance(getattr(experts, flag, None), bool)]
            if missing:
                raise TypeError(
                    f"S2FT does not know the layout of the experts module {kind}: it lacks {', '.join(missing)}, "
                    "which transformers' `@use_experts_implementation` decorator sets, and it is not Llama4's "
                    "`Llama4TextExperts`. Only fused 3-D experts (gate_up_proj, down_proj) of those kinds are "
                    "supported."
                )
            if getattr(experts, "has_gate", True) is not True:
                raise TypeError(
                    f"S2FT does not support the experts module {kind}: it has no gate (`has_gate=False`, an up_proj "
                    "only), while the S2FT expert unit is a gated channel of gate_up_proj."
                )
            if getattr(experts, "has_post_expert_norm", False):
                raise TypeError(
                    f"S2FT does not support the experts module {kind}: it normalizes each expert's output after the "
                    "down projection (`has_post_expert_norm=True`), so a delta on down_proj is not an additive term."
                )
            if not callable(getattr(experts, "_apply_gate", None)):
                raise TypeError(f"S2FT does not support the experts module {kind}: it has no `_apply_gate`.")
            layout = cls(
                transposed=experts.is_transposed,
                interleaved=not experts.is_concatenated,
                has_bias=experts.has_bias,
                convention=ROUTED,
            )
        layout.dims(experts)  # checks the parameters' shapes
        return layout

    # ----------------------------------------------------------------------------------------------
    # where a channel lives
    @property
    def gate_up_dim(self) -> int:
        """The dimension of the 3-D `gate_up_proj` that indexes gate/up outputs (rows, or columns if transposed)."""
        return 2 if self.transposed else 1

    @property
    def down_dim(self) -> int:
        """The dimension of the 3-D `down_proj` that indexes channels (columns, or rows if transposed)."""
        return 1 if self.transposed else 2

    def gate_position(self, channel, intermediate_size: int):
        """Where channel c's gate output sits along `gate_up_dim` of an expert's gate_up_proj: c, or 2c."""
        return 2 * channel if self.interleaved else channel

    def up_position(self, channel, intermediate_size: int):
        """Where channel c's up output sits along `gate_up_dim`: I + c, or 2c + 1."""
        return 2 * channel + 1 if self.interleaved else intermediate_size + channel

    def packed_positions(self, channels: torch.Tensor, intermediate_size: int) -> torch.Tensor:
        """Gate/up positions of `channels` [..., k] as [..., 2k], in the order the module's gate function reads.

        Concatenated: [gate of c_1..c_k, up of c_1..c_k] (split by `chunk(2)`); interleaved: [gate c_1, up c_1, ...]
        (split by `[..., ::2]`, `[..., 1::2]`). The gate function of the packed pre-activations is channel c_j's h.
        """
        gate = self.gate_position(channels, intermediate_size)
        up = self.up_position(channels, intermediate_size)
        if self.interleaved:
            return torch.stack((gate, up), dim=-1).flatten(-2)
        return torch.cat((gate, up), dim=-1)

    def dims(self, experts: nn.Module) -> tuple[int, int, int]:
        """(num_experts E, hidden size H, intermediate size I), checked against both weights' shapes."""
        kind = f"{type(experts).__module__}.{type(experts).__qualname__}"
        gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
            raise TypeError(f"The experts module {kind} has no 3-D `gate_up_proj` and `down_proj` tensors.")
        if gate_up.ndim != 3 or down.ndim != 3:
            raise TypeError(f"The experts module {kind} stores gate_up_proj or down_proj with other than 3 dims.")
        num_experts = gate_up.shape[0]
        if self.transposed:
            hidden, intermediate = gate_up.shape[1], gate_up.shape[2] // 2
            expected_down = (num_experts, intermediate, hidden)
        else:
            hidden, intermediate = gate_up.shape[2], gate_up.shape[1] // 2
            expected_down = (num_experts, hidden, intermediate)
        if gate_up.shape[self.gate_up_dim] != 2 * intermediate or tuple(down.shape) != expected_down:
            raise TypeError(
                f"The experts module {kind} has gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)}, "
                f"which do not fit the layout {self}."
            )
        if self.has_bias:
            bias = getattr(experts, "gate_up_proj_bias", None)
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (num_experts, 2 * intermediate):
                raise TypeError(f"The experts module {kind} declares has_bias but has no [E, 2I] gate_up_proj_bias.")
        return num_experts, hidden, intermediate


def _is_llama4_experts(module: nn.Module) -> bool:
    try:
        from transformers.models.llama4.modeling_llama4 import Llama4TextExperts
    except ImportError:  # pragma: no cover - transformers without Llama4
        return False
    return isinstance(module, Llama4TextExperts)


def gate_function(experts: nn.Module, layout: ExpertsLayout):
    """The module's own map from packed gate/up pre-activations [..., 2m] to h [..., m] (elementwise per channel).

    Routed modules carry it as `_apply_gate` (the decorator's default `act_fn(gate) * up`, or a class's own, such
    as GPT-OSS's clamped SwiGLU); Llama4 inlines `up * act_fn(gate)` in its forward.
    """
    if layout.convention == PER_EXPERT:
        act_fn = experts.act_fn

        def llama4_gate(gate_up: torch.Tensor) -> torch.Tensor:
            gate, up = gate_up.chunk(2, dim=-1)
            return up * act_fn(gate)

        return llama4_gate
    return experts._apply_gate


# --------------------------------------------------------------------------------------------------
# the extra term
def _route(top_k_index: torch.Tensor | None, num_experts: int, rows: int, device):
    """Routed (token, slot) pairs sorted by expert: (order, token of each sorted pair, per-expert counts).

    Slots whose expert id is outside [0, E) (expert-parallel sentinels) sort to the end and are left out. Without
    an index (PER_EXPERT), row r of the input belongs to expert r // (rows / E).
    """
    if top_k_index is None:
        order = torch.arange(rows, device=device)
        return order, order, [rows // num_experts] * num_experts
    top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    expert_ids = torch.where((expert_ids >= 0) & (expert_ids < num_experts), expert_ids, num_experts)
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=num_experts + 1)[:num_experts].tolist()  # one host sync
    return order, order // top_k, counts


def _selected_gate_up(gate_up_proj, gate_up_bias, layout, positions, dtype):
    """Expert weights' rows at `positions` [E, 2k] as [E, 2k, H] (out, in), and the bias entries [E, 2k]."""
    dim = layout.gate_up_dim
    num_experts, width = positions.shape
    if layout.transposed:
        index = positions[:, None, :].expand(num_experts, gate_up_proj.shape[1], width)
        weight = gate_up_proj.gather(dim, index).transpose(1, 2)
    else:
        index = positions[:, :, None].expand(num_experts, width, gate_up_proj.shape[2])
        weight = gate_up_proj.gather(dim, index)
    bias = None if gate_up_bias is None else gate_up_bias.gather(1, positions).to(dtype)
    return weight.to(dtype), bias


def _spans(counts):
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, start, start + count
        start += count


class ExpertsChannelDelta(torch.autograd.Function):
    """sum over routed (token t, slot j) with expert e of  w[t, j] * D_e h_e(x_t)[S_e],  index-added per token.

    Inputs: hidden [T, H]; top_k_index [T, K] (expert ids), or None for PER_EXPERT input (T rows in E equal blocks,
    block e for expert e); top_k_weights [T, K] or None (weight 1); the frozen gate_up_proj (and its bias or None);
    delta [E, H, k]; indices [E, k]; `spec = (layout, gate_fn)` constants.
    Only k channels per expert are computed: a 2k-wide matmul against gathered gate/up rows. Saved: the packed
    pre-activations [routed pairs, 2k], plus tensors alive anyway (weights, routing index and weights; hidden
    itself only when gate_up_proj is made trainable). h is recomputed from them in backward, where the gate
    function's own autograd gives its derivative (so clamps and custom activations are exact).

    The loop over experts mirrors the eager implementation. A grouped version would sort once, pass the gathered
    [E, H, 2k] rows and [E, k, H] deltas to `torch.nn.functional.grouped_mm` with the per-expert offsets (two
    grouped matmuls forward, four backward), with no host sync.
    """

    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, gate_up_proj, gate_up_bias, delta, indices, spec):
        layout, gate_fn = spec
        num_experts = delta.shape[0]
        intermediate = gate_up_proj.shape[layout.gate_up_dim] // 2
        dtype, autocast = _compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False) if autocast else contextlib.nullcontext():
            x = hidden.to(dtype)
            positions = layout.packed_positions(indices, intermediate)
            weight, bias = _selected_gate_up(gate_up_proj, gate_up_bias, layout, positions, dtype)
            order, token_of, counts = _route(top_k_index, num_experts, x.shape[0], x.device)
            weights_sorted = None if top_k_weights is None else top_k_weights.reshape(-1)[order]
            # One gather of the routed tokens and one scatter of their results; per expert only the two matmuls.
            routed_pairs = sum(counts)
            tokens = token_of[:routed_pairs]
            routed = x.index_select(0, tokens)
            pre = x.new_empty(routed_pairs, positions.shape[1])
            y = x.new_empty(routed_pairs, x.shape[1])
            for e, start, stop in _spans(counts):
                if bias is None:
                    torch.mm(routed[start:stop], weight[e].t(), out=pre[start:stop])
                else:
                    torch.addmm(bias[e], routed[start:stop], weight[e].t(), out=pre[start:stop])
            h = gate_fn(pre)
            for e, start, stop in _spans(counts):
                torch.mm(h[start:stop], delta[e].to(dtype).t(), out=y[start:stop])
            if weights_sorted is not None:
                y = y * weights_sorted[:routed_pairs, None]  # promoted as the eager experts code does
            out = torch.zeros_like(hidden).index_add_(0, tokens, y.to(hidden.dtype))
        ctx.spec, ctx.dtype, ctx.hidden_dtype = spec, dtype, hidden.dtype
        full_input = [hidden] if ctx.needs_input_grad[3] else []  # a trainable gate_up_proj needs all of hidden
        ctx.save_for_backward(gate_up_proj, gate_up_bias, delta, indices, top_k_index, top_k_weights, pre, *full_input)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        layout, gate_fn = ctx.spec
        gate_up_proj, gate_up_bias, delta, indices, top_k_index, top_k_weights, pre, *full_input = ctx.saved_tensors
        dtype = ctx.dtype
        num_experts = delta.shape[0]
        intermediate = gate_up_proj.shape[layout.gate_up_dim] // 2
        wants_x, _, wants_w, wants_gu, wants_bias, wants_delta = ctx.needs_input_grad[:6]
        positions = layout.packed_positions(indices, intermediate)
        order, token_of, counts = _route(top_k_index, num_experts, grad_out.shape[0], grad_out.device)
        weights_sorted = None if top_k_weights is None else top_k_weights.reshape(-1)[order]
        g = grad_out.to(dtype)

        with torch.enable_grad():
            pre_leaf = pre.detach().requires_grad_()
            h_graph = gate_fn(pre_leaf)
        h = h_graph.detach()
        wide = dtype if weights_sorted is None else torch.promote_types(dtype, weights_sorted.dtype)
        grad_h = torch.empty(h.shape, dtype=wide, device=h.device)
        grad_delta = torch.zeros(delta.shape, dtype=dtype, device=delta.device) if wants_delta else None
        grad_w_sorted = None if weights_sorted is None or not wants_w else torch.zeros_like(weights_sorted)
        for e, start, stop in _spans(counts):
            g_e = g[token_of[start:stop]]
            q = g_e @ delta[e].to(dtype)  # [n, k]: the output gradient seen by h[S_e]
            h_e = h[start:stop]
            if weights_sorted is None:
                grad_h[start:stop] = q
                if wants_delta:
                    grad_delta[e] = g_e.t() @ h_e
                continue
            w_e = weights_sorted[start:stop, None]
            grad_h[start:stop] = q * w_e
            if wants_delta:
                grad_delta[e] = g_e.t() @ (h_e * w_e).to(dtype)
            if grad_w_sorted is not None:
                grad_w_sorted[start:stop] = (q.to(wide) * h_e.to(wide)).sum(-1).to(weights_sorted.dtype)

        grad_x = grad_gu = grad_bias = grad_w = None
        if wants_x or wants_gu or wants_bias:
            (grad_pre,) = torch.autograd.grad(h_graph, pre_leaf, grad_h.to(h_graph.dtype))
            weight, _ = _selected_gate_up(gate_up_proj, None, layout, positions, dtype)
            if wants_x:
                grad_x = torch.zeros(g.shape[0], weight.shape[2], dtype=dtype, device=g.device)
                for e, start, stop in _spans(counts):
                    grad_x.index_add_(0, token_of[start:stop], grad_pre[start:stop] @ weight[e])
                grad_x = grad_x.to(ctx.hidden_dtype)
            if wants_gu:
                x = full_input[0].to(dtype)
                grad_rows = torch.zeros(weight.shape, dtype=dtype, device=weight.device)  # [E, 2k, H]
                for e, start, stop in _spans(counts):
                    grad_rows[e] = grad_pre[start:stop].t() @ x[token_of[start:stop]]
                grad_gu = torch.zeros(gate_up_proj.shape, dtype=dtype, device=gate_up_proj.device)
                if layout.transposed:
                    index = positions[:, None, :].expand(num_experts, gate_up_proj.shape[1], positions.shape[1])
                    grad_gu.scatter_add_(2, index, grad_rows.transpose(1, 2))
                else:
                    grad_gu.scatter_add_(1, positions[:, :, None].expand_as(grad_rows), grad_rows)
                grad_gu = grad_gu.to(gate_up_proj.dtype)
            if wants_bias:
                sums = torch.zeros(positions.shape, dtype=dtype, device=grad_pre.device)
                for e, start, stop in _spans(counts):
                    sums[e] = grad_pre[start:stop].sum(0)
                grad_bias = torch.zeros(gate_up_bias.shape, dtype=dtype, device=gate_up_bias.device)
                grad_bias = grad_bias.scatter_add_(1, positions, sums).to(gate_up_bias.dtype)
        if grad_w_sorted is not None:
            flat = torch.zeros(top_k_weights.numel(), dtype=top_k_weights.dtype, device=top_k_weights.device)
            flat[order[: len(grad_w_sorted)]] = grad_w_sorted
            grad_w = flat.view(top_k_weights.shape)
        if grad_delta is not None:
            grad_delta = grad_delta.to(delta.dtype)
        return grad_x, None, grad_w, grad_gu, grad_bias, grad_delta, None, None


def experts_extra_term(
    experts: nn.Module,
    layout: ExpertsLayout,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor | None,
    delta: torch.Tensor,
    indices: torch.Tensor,
) -> torch.Tensor:
    """One adapter's extra term for a 2-D `hidden`, through `ExpertsChannelDelta`."""
    bias = experts.gate_up_proj_bias if layout.has_bias else None
    spec = (layout, gate_function(experts, layout))
    return ExpertsChannelDelta.apply(
        hidden, top_k_index, top_k_weights, experts.gate_up_proj, bias, delta, indices, spec
    )


# --------------------------------------------------------------------------------------------------
class S2FTExpertsLayer(S2FTTunerLayer):
    """Wraps a fused experts module; `s2ft_delta[name]` [E, H, k] is the trainable block of every expert,
    `s2ft_indices[name]` [E, k] its channels (original numbering, one row per expert).

    The base module is called as it is, so the kernel `config._experts_implementation` selects keeps running; each
    active adapter adds its extra term. Merging writes the deltas into down_proj's columns (rows where transposed)
    and keeps what it overwrote, so unmerging restores them bit for bit.
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, indices: torch.Tensor, init_weights: bool = True
    ) -> None:
        super().__init__()
        for name, tensor in base_layer.named_parameters(recurse=False):
            quantized.check_plain(tensor, f"the fused experts' {name} ({type(base_layer).__name__})")
        self.layout = ExpertsLayout.from_module(base_layer)
        self.base_layer = base_layer
        self.num_experts, self.hidden_size, self.intermediate_size = self.layout.dims(base_layer)
        # the names of the routed forward's (hidden, index, weights) arguments, e.g. GPT-OSS's router_indices
        if self.layout.convention == ROUTED:
            params = tuple(inspect.signature(type(base_layer).forward).parameters)[1:4]
            default = ("hidden_states", "top_k_index", "top_k_weights")
            self._argument_names = params if len(params) == 3 else default
        self.s2ft_delta = nn.ParameterDict({})
        self.s2ft_indices = BufferDict({}, persistent=True)
        self.s2ft_merge_backup = BufferDict({}, persistent=False)
        # CPU copies of the indices, which survive `to_empty` (meta-device construction); see `_apply`.
        self._index_master: dict[str, torch.Tensor] = {}
        self._init_weights: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, indices, init_weights)

    # ----------------------------------------------------------------------------------------------
    # adapters
    def delta_shape(self, num_selected: int) -> tuple[int, int, int]:
        return (self.num_experts, self.hidden_size, num_selected)

    def update_layer(
        self, adapter_name: str, indices: torch.Tensor, init_weights: bool = True, inference_mode: bool = False
    ) -> None:
        weight = self.get_base_layer().down_proj
        indices = self._checked_indices(adapter_name, indices)
        delta = torch.zeros(self.delta_shape(indices.shape[1]), dtype=weight.dtype, device=weight.device)
        self._init_weights[adapter_name] = init_weights
        self.s2ft_delta[adapter_name] = nn.Parameter(delta)
        self._initialize_delta(adapter_name)
        self._set_indices(adapter_name, indices)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _checked_indices(self, adapter_name: str, indices) -> torch.Tensor:
        # (a tensor is not passed through as_tensor, which would move it to a default-device context's device)
        indices = (indices if isinstance(indices, torch.Tensor) else torch.as_tensor(indices, device="cpu")).cpu()
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError(f"S2FT expert indices for adapter '{adapter_name}' must be integers, got {indices.dtype}.")
        indices = indices.long().clone()
        experts, limit = self.num_experts, self.intermediate_size
        if indices.ndim != 2 or indices.shape[0] != experts or indices.shape[1] == 0:
            raise ValueError(
                f"S2FT expert indices for adapter '{adapter_name}' must have shape [num_experts={experts}, k] with "
                f"k >= 1 (the same count of channels for every expert), got {tuple(indices.shape)}."
            )
        if int(indices.min()) < 0 or int(indices.max()) >= limit:
            raise ValueError(f"S2FT expert indices for adapter '{adapter_name}' must lie in [0, {limit}).")
        ordered = indices.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        if bool(repeated.any()):
            rows = repeated.nonzero().flatten().tolist()
            raise ValueError(f"S2FT expert indices for adapter '{adapter_name}' contain duplicates (experts {rows}).")
        return indices

    def _index_device(self) -> torch.device:
        return self.get_base_layer().down_proj.device

    def _down_index(self, adapter_name: str, device) -> tuple[int, torch.Tensor]:
        """(dim, gather/scatter index) addressing the adapter's block of down_proj."""
        down = self.get_base_layer().down_proj
        index = self.s2ft_indices[adapter_name].to(device)
        experts, k = index.shape
        if self.layout.transposed:
            return 1, index[:, :, None].expand(experts, k, down.shape[2])
        return 2, index[:, None, :].expand(experts, down.shape[1], k)

    def _as_down_block(self, delta: torch.Tensor) -> torch.Tensor:
        """[E, H, k] delta in down_proj's orientation: [E, H, k], or [E, k, H] where transposed."""
        return delta.transpose(1, 2) if self.layout.transposed else delta

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense delta against down_proj ([E, H, I], or [E, I, H] where transposed), for export."""
        down = self.get_base_layer().down_proj
        dim, index = self._down_index(adapter_name, down.device)
        delta = self._as_down_block(self.s2ft_delta[adapter_name].detach().to(device=down.device, dtype=down.dtype))
        return torch.zeros(down.shape, dtype=down.dtype, device=down.device).scatter_(dim, index, delta)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False  # a per-expert delta has no nn.Linear LoRA equivalent here

    # ----------------------------------------------------------------------------------------------
    # merging: write the block into down_proj, keep what it overwrote, restore that by copy
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().down_proj.data
        for name in adapter_names:
            if name not in self.s2ft_delta:
                continue
            dim, index = self._down_index(name, weight.device)
            original = weight.gather(dim, index)
            delta = self._as_down_block(self.s2ft_delta[name].detach())
            wide = torch.promote_types(weight.dtype, delta.dtype)
            merged = (original.to(wide) + delta.to(device=weight.device, dtype=wide)).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            weight.scatter_(dim, index, merged)
            self.s2ft_merge_backup[name] = original
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().down_proj.data
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            dim, index = self._down_index(name, weight.device)
            weight.scatter_(dim, index, self.s2ft_merge_backup[name].to(weight.device))
            del self.s2ft_merge_backup[name]

    # ----------------------------------------------------------------------------------------------
    def _routing(self, args, kwargs):
        """(hidden, top_k_index, top_k_weights) of a call, for either convention."""
        if self.layout.convention == PER_EXPERT:
            hidden = args[0] if args else kwargs["hidden_states"]
            return hidden, None, None
        values = dict(zip(self._argument_names, args, strict=False))
        values.update(kwargs)
        return tuple(values.get(name) for name in self._argument_names)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        groups = kwargs.pop(GROUPS_KWARG, None) or current_groups()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        if groups is not None:
            return self._mixed_batch_forward(groups, args, kwargs)
        active = [name for name in self.active_adapters if name in self.s2ft_delta]
        if self.merged or not active:
            return self.base_layer(*args, **kwargs)
        out = self.base_layer(*args, **kwargs)
        hidden, index, weights = self._routing(args, kwargs)
        base = self.get_base_layer()
        hidden2 = hidden.reshape(-1, hidden.shape[-1])
        for name in active:
            extra = experts_extra_term(
                base, self.layout, hidden2, index, weights, self.s2ft_delta[name], self.s2ft_indices[name]
            )
            out = out + extra.view(out.shape)
        return out

    def _mixed_batch_forward(self, groups: RowGroups, args, kwargs) -> torch.Tensor:
        """The experts once for all tokens, then each adapter's extra term on its rows' tokens only.

        Routed experts see the batch flattened to (batch * positions, hidden), so a row's tokens are a contiguous
        run of that axis."""
        if self.merged:
            raise ValueError(
                f"Cannot pass `adapter_names` while adapter(s) {', '.join(self.merged_adapters)} are merged into the "
                "base weights: every row would see them. Call unmerge_adapter() first."
            )
        if self.layout.convention == PER_EXPERT:
            raise ValueError(
                f"Mixed-adapter batches (`adapter_names`) are not supported on {type(self.base_layer).__name__}: it "
                "receives tokens already dispatched per expert, so their batch rows are unknown here. Run one batch "
                "per adapter after set_adapter(name)."
            )
        out = self.base_layer(*args, **kwargs)
        hidden, index, weights = self._routing(args, kwargs)
        hidden2 = hidden.reshape(-1, hidden.shape[-1])
        flat = out.view(hidden2.shape[0], -1)
        base = self.get_base_layer()
        for name, tokens in groups.rows_of(hidden2, type(self.base_layer).__name__):
            if name not in self.s2ft_delta:
                continue
            extra = experts_extra_term(
                base,
                self.layout,
                hidden2.index_select(0, tokens),
                index.index_select(0, tokens),
                weights.index_select(0, tokens),
                self.s2ft_delta[name],
                self.s2ft_indices[name],
            )
            flat.index_add_(0, tokens, extra.reshape(len(tokens), -1).to(flat.dtype))
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A torch-level load copies tensors as they are: it can only take the channels this layer trains.
        from .checkpoint import check_experts_layer_entries

        check_experts_layer_entries(self, state_dict, prefix, align=True)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __repr__(self) -> str:
        return "s2ft." + super().__repr__()

    def extra_repr(self) -> str:
        return f"layout={self.layout}"


def attach_experts(
    parent: nn.Module, child_name: str, adapter_name: str, indices: torch.Tensor, init_weights: bool
) -> S2FTExpertsLayer:
    """Wrap the experts module `parent.<child_name>` (or add an adapter to its S2FT layer) training `indices`."""
    target = getattr(parent, child_name)
    if isinstance(target, S2FTExpertsLayer):
        target.update_layer(adapter_name, indices, init_weights)
        return target
    layer = S2FTExpertsLayer(target, adapter_name, indices, init_weights)
    setattr(parent, child_name, layer)
    return layer


__all__ = [
    "PER_EXPERT",
    "ROUTED",
    "ExpertsChannelDelta",
    "ExpertsLayout",
    "S2FTExpertsLayer",
    "attach_experts",
    "experts_extra_term",
    "gate_function",
]
