"""S2FT on fused MoE experts (peft_s2ft/experts.py) against dense references, family by family.

Every check builds a tiny random model from its config (hidden 32, FFN width 48, 4 experts, top-2, 2 layers),
takes layer 0's experts module and compares the wrapped module with the original module run on a modified COPY of
down_proj (the delta scattered into the selected channels), via `torch.func.functional_call`.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from accelerate import init_empty_weights
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.func import functional_call
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GptOssConfig,
    Llama4TextConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from peft_s2ft.experts import PER_EXPERT, ROUTED, ExpertsLayout, S2FTExpertsLayer, gate_function

H, FFN, E, TOP_K, K = 32, 48, 4, 2, 5  # hidden, FFN width, experts, experts per token, channels per expert
T = 20  # tokens
COMMON = dict(
    vocab_size=64,
    hidden_size=H,
    num_hidden_layers=2,
    max_position_embeddings=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
CONFIGS = {
    "mixtral": lambda: MixtralConfig(**COMMON, intermediate_size=FFN, num_local_experts=E, num_experts_per_tok=TOP_K),
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **COMMON,
        intermediate_size=64,
        moe_intermediate_size=FFN,
        shared_expert_intermediate_size=40,
        num_experts=E,
        num_experts_per_tok=TOP_K,
    ),
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **COMMON, intermediate_size=64, moe_intermediate_size=FFN, num_experts=E, num_experts_per_tok=TOP_K, head_dim=8
    ),
    "olmoe": lambda: OlmoeConfig(**COMMON, intermediate_size=FFN, num_experts=E, num_experts_per_tok=TOP_K),
    "gpt_oss": lambda: GptOssConfig(
        **COMMON, intermediate_size=FFN, num_local_experts=E, num_experts_per_tok=TOP_K, head_dim=8
    ),
    "llama4": lambda: Llama4TextConfig(
        **COMMON, intermediate_size=FFN, intermediate_size_mlp=64, num_local_experts=E, num_experts_per_tok=TOP_K
    ),
    "deepseek_v3": lambda: DeepseekV3Config(
        **COMMON,
        intermediate_size=64,
        moe_intermediate_size=FFN,
        n_routed_experts=E,
        num_experts_per_tok=TOP_K,
        first_k_dense_replace=0,
        n_group=1,
        topk_group=1,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}
FAMILIES = list(CONFIGS)
EXPECTED_LAYOUT = {
    "mixtral": ExpertsLayout(transposed=False, interleaved=False, has_bias=False),
    "qwen2_moe": ExpertsLayout(transposed=False, interleaved=False, has_bias=False),
    "qwen3_moe": ExpertsLayout(transposed=False, interleaved=False, has_bias=False),
    "olmoe": ExpertsLayout(transposed=False, interleaved=False, has_bias=False),
    "deepseek_v3": ExpertsLayout(transposed=False, interleaved=False, has_bias=False),
    "gpt_oss": ExpertsLayout(transposed=True, interleaved=True, has_bias=True),
    "llama4": ExpertsLayout(transposed=True, interleaved=False, has_bias=False, convention=PER_EXPERT),
}
# (family, experts implementation); Llama4's module has a single (dense bmm) implementation.
CASES = [(f, impl) for f in FAMILIES if f != "llama4" for impl in ("eager", "grouped_mm")] + [("llama4", "eager")]
_MODELS: dict[str, nn.Module] = {}


def tiny_model(family: str) -> nn.Module:
    if family not in _MODELS:
        torch.manual_seed(0)
        _MODELS[family] = AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    return _MODELS[family]


def experts_of(model: nn.Module, layer: int = 0) -> nn.Module:
    block = model.model.layers[layer]
    return block.feed_forward.experts if hasattr(block, "feed_forward") else block.mlp.experts


def fresh_experts(family: str, implementation: str = "eager", seed: int = 0, width: int | None = None) -> nn.Module:
    """Layer 0's experts (a copy), frozen, with weights large enough that activations (and GPT-OSS's clamps) bite.

    With `width`, a module of that FFN width built from the family's config instead.
    """
    experts = copy.deepcopy(experts_of(tiny_model(family)))
    if width is not None:
        config = CONFIGS[family]()
        setattr(
            config, "moe_intermediate_size" if hasattr(config, "moe_intermediate_size") else "intermediate_size", width
        )
        experts = type(experts)(config)
    if hasattr(experts, "config"):
        experts.config._experts_implementation = implementation
    gen = torch.Generator().manual_seed(seed)
    std = 1.0 if family == "gpt_oss" else 0.3  # GPT-OSS: pre-activations of several units cross its limit 7
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return experts.requires_grad_(False)


def random_indices(seed: int = 0, k: int = K, width: int = FFN) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(width, generator=gen)[:k] for _ in range(E)])  # unsorted on purpose


def wrap(experts: nn.Module, seed: int = 0, k: int = K, name: str = "default") -> S2FTExpertsLayer:
    width = ExpertsLayout.from_module(experts).dims(experts)[2]
    layer = S2FTExpertsLayer(experts, name, random_indices(seed, k, width), init_weights=False)
    with torch.no_grad():
        layer.s2ft_delta[name].copy_(torch.randn(E, H, k, generator=torch.Generator().manual_seed(seed + 7)) * 0.3)
    return layer


class Inputs:
    """Fresh leaves for a call: hidden states and routing weights; `args` what the experts module is called with.

    Routed families: (x [T, H], top_k_index [T, 2], weights [T, 2]). Llama4: like `Llama4TextMoe.forward`, the
    tokens repeated once per expert and scaled by a [T, E] router score that is zero off the top-2.
    """

    def __init__(self, family: str, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(T, H, generator=gen)
        self.index = torch.stack([torch.randperm(E, generator=gen)[:TOP_K] for _ in range(T)])
        self.weights = torch.rand(T, TOP_K, generator=gen) + 0.1
        self.per_expert = family == "llama4"
        if self.per_expert:
            self.weights = torch.zeros(T, E).scatter_(1, self.index, self.weights)

    def leaves(self):
        x, w = self.x.clone().requires_grad_(), self.weights.clone().requires_grad_()
        if self.per_expert:
            return x, w, (x.repeat(E, 1) * w.t().reshape(-1, 1),)
        return x, w, (x, self.index, w)


def dense_reference(layer: S2FTExpertsLayer, inputs: Inputs, names=("default",)):
    """The original module on a copy of down_proj with the deltas added; returns (output, leaves, dense weight)."""
    base = layer.get_base_layer()
    dense = base.down_proj.detach().clone()
    for name in names:
        dense += layer.get_delta_weight(name)
    dense.requires_grad_()
    x, w, args = inputs.leaves()
    return functional_call(base, {"down_proj": dense}, args), (x, w), dense


def gathered(layer: S2FTExpertsLayer, dense_grad: torch.Tensor, name: str = "default") -> torch.Tensor:
    """The dense weight's gradient at the adapter's channels, as [E, H, k]."""
    index = layer.s2ft_indices[name]
    if layer.layout.transposed:
        return dense_grad.gather(1, index[:, :, None].expand(E, index.shape[1], H)).transpose(1, 2)
    return dense_grad.gather(2, index[:, None, :].expand(E, H, index.shape[1]))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 2e-6) -> None:
    scale = max(1.0, float(expected.detach().abs().max()))
    err = float((actual - expected).detach().abs().max())
    assert err <= rel * scale, f"max error {err:.3g} at scale {scale:.3g}"


def base_snapshot(experts: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in experts.named_parameters()}


def assert_bit_identical(experts: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    for name, p in experts.named_parameters():
        assert torch.equal(p, snapshot[name]), name
        assert p.grad is None, name


# --------------------------------------------------------------------------------------------------
# layout
@pytest.mark.parametrize("family", FAMILIES)
def test_layout_and_positions(family):
    experts = fresh_experts(family)
    layout = ExpertsLayout.from_module(experts)
    assert layout == EXPECTED_LAYOUT[family]
    assert layout.dims(experts) == (E, H, FFN)
    assert experts.gate_up_proj.shape[layout.gate_up_dim] == 2 * FFN and experts.down_proj.shape[layout.down_dim] == FFN
    # The packed positions pick exactly channel c's gate and up: the gate function of the full pre-activations,
    # taken at the channels, equals the gate function of the packed selection.
    channels = random_indices()[0]
    x = torch.randn(7, H)
    weight = experts.gate_up_proj[0]
    full = x @ weight if layout.transposed else x @ weight.t()
    if layout.has_bias:
        full = full + experts.gate_up_proj_bias[0]
    gate_fn = gate_function(experts, layout)
    packed = full[:, layout.packed_positions(channels, FFN)]
    # (equal up to rounding: vectorized activations may round a lane differently from the same value elsewhere)
    assert_close(gate_fn(packed), gate_fn(full)[:, channels], rel=1e-6)
    c = 5
    expected = (2 * c, 2 * c + 1) if layout.interleaved else (c, FFN + c)
    assert (layout.gate_position(c, FFN), layout.up_position(c, FFN)) == expected


def test_gpt_oss_layout_is_interleaved_and_transposed():
    experts = fresh_experts("gpt_oss")
    assert (experts.is_concatenated, experts.is_transposed, experts.has_bias) == (False, True, True)
    assert tuple(experts.gate_up_proj.shape) == (E, H, 2 * FFN) and tuple(experts.down_proj.shape) == (E, FFN, H)


class _Plain(nn.Module):
    def __init__(self, **flags):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * FFN, H))
        self.down_proj = nn.Parameter(torch.zeros(E, H, FFN))
        for key, value in flags.items():
            setattr(self, key, value)


FLAGS = dict(is_transposed=False, is_concatenated=True, has_bias=False, has_gate=True, has_post_expert_norm=False)


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (nn.Linear(4, 4), "does not know the layout"),
        (_Plain(), "is_transposed, is_concatenated, has_bias"),
        (_Plain(**{**FLAGS, "has_gate": False}), "has no gate"),
        (_Plain(**{**FLAGS, "has_post_expert_norm": True}), "has_post_expert_norm"),
        (_Plain(**{**FLAGS, "is_transposed": True}), "do not fit the layout"),
        (_Plain(**{**FLAGS, "has_bias": True}), "gate_up_proj_bias"),
    ],
)
def test_refuses_unknown_experts(module, message):
    if message not in ("does not know the layout", "is_transposed, is_concatenated, has_bias"):
        module._apply_gate = lambda gate_up: gate_up
    with pytest.raises(TypeError, match=message):
        ExpertsLayout.from_module(module)


def test_refuses_wrapped_module():
    layer = wrap(fresh_experts("mixtral"))
    with pytest.raises(TypeError, match="already a PEFT tuner layer"):
        S2FTExpertsLayer(layer, "other", random_indices())


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        (torch.zeros(E, K), "must be integers"),
        (torch.arange(K), r"shape \[num_experts=4, k\]"),
        (torch.zeros(E - 1, K, dtype=torch.long), r"shape \[num_experts=4, k\]"),
        (torch.zeros(E, 0, dtype=torch.long), r"k >= 1"),
        (torch.full((E, K), FFN), r"\[0, 48\)"),
        (torch.full((E, K), -1), r"\[0, 48\)"),
        (torch.tensor([[0, 1], [2, 3], [4, 4], [5, 6]]), r"duplicates \(experts \[2\]\)"),
    ],
)
def test_index_validation(indices, message):
    with pytest.raises(ValueError, match=message):
        S2FTExpertsLayer(fresh_experts("mixtral"), "default", indices)


# --------------------------------------------------------------------------------------------------
# the extra term against dense autograd
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: threads only add contention (several suites share the machine's cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("family", "implementation"), [*CASES, ("mixtral", "odd"), ("gpt_oss", "odd"), ("llama4", "odd")]
)
def test_matches_dense_reference(family, implementation):
    # "odd": FFN width 45 with the eager kernels (transformers' grouped_mm needs 16-byte strides on CPU)
    odd = implementation == "odd"
    experts = fresh_experts(family, "eager" if odd else implementation, width=45 if odd else None)
    layer = wrap(experts)
    snapshot = base_snapshot(experts)
    inputs = Inputs(family)
    x, w, args = inputs.leaves()
    out = layer(*args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    delta = layer.s2ft_delta["default"]
    gx, gw, gd = torch.autograd.grad(out, (x, w, delta), grad)
    ref, (rx, rw), dense = dense_reference(layer, inputs)
    rgx, rgw, rgd = torch.autograd.grad(ref, (rx, rw, dense), grad)
    assert_close(out, ref)
    assert_close(gx, rgx)
    assert_close(gw, rgw)
    assert_close(gd, gathered(layer, rgd))
    assert float((out - functional_call(experts, {}, args)).detach().abs().max()) > 1e-2  # the delta does something
    assert_bit_identical(experts, snapshot)
    if family == "gpt_oss":  # the selected units exercise both sides of the clamped SwiGLU
        with torch.no_grad():
            full = x @ experts.gate_up_proj + experts.gate_up_proj_bias[:, None]  # [E, T, 2I]
            positions = layer.layout.packed_positions(layer.s2ft_indices["default"], layer.intermediate_size)
            picked = full.gather(2, positions[:, None, :].expand(E, T, 2 * K))
        assert (picked > experts.limit).any() and (picked.abs() < experts.limit).any()


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_trainable_gate_up_gets_the_adapters_share(family):
    """Users who unfreeze gate_up_proj (and its bias) still get the exact gradient through the extra term."""
    experts = fresh_experts(family)
    layer = wrap(experts)
    trainable = ["gate_up_proj"] + (["gate_up_proj_bias"] if layer.layout.has_bias else [])
    inputs = Inputs(family)
    x, w, args = inputs.leaves()
    for name in trainable:
        getattr(experts, name).requires_grad_(True)
    out = layer(*args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, [getattr(experts, n) for n in trainable], grad)
    ref, _, dense = dense_reference(layer, inputs)
    ref_grads = torch.autograd.grad(ref, [getattr(experts, n) for n in trainable], grad)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert_close(got, expected)


def test_several_active_adapters_sum_and_merge():
    experts = fresh_experts("gpt_oss")
    layer = wrap(experts, seed=0, name="a")
    layer.update_layer("b", random_indices(seed=1, k=3), init_weights=False)  # overlapping channels
    layer.set_adapter(["a", "b"])
    assert layer.s2ft_delta["a"].requires_grad and layer.s2ft_delta["b"].requires_grad
    inputs = Inputs("gpt_oss")
    _, _, args = inputs.leaves()
    out = layer(*args)
    ref, _, _ = dense_reference(layer, inputs, names=("a", "b"))
    assert_close(out, ref)
    original = experts.down_proj.detach().clone()
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["a", "b"]
    assert_close(layer(*args), out.detach())
    layer.unmerge()
    assert torch.equal(experts.down_proj, original)
    layer.set_adapter("a")
    assert not layer.s2ft_delta["b"].requires_grad
    ref_a, _, _ = dense_reference(layer, inputs, names=("a",))
    assert_close(layer(*args), ref_a)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_unmerge_disable(family):
    experts = fresh_experts(family)
    layer = wrap(experts)
    _, _, args = Inputs(family).leaves()
    with torch.no_grad():
        unmerged = layer(*args)
        base_out = functional_call(experts, {}, args)
        original = experts.down_proj.detach().clone()
        dense = layer.get_delta_weight("default")
        assert dense.shape == experts.down_proj.shape
        assert int((dense != 0).sum()) == E * H * K
        layer.merge(safe_merge=True)
        assert torch.equal(experts.down_proj, original + dense)
        assert_close(layer(*args), unmerged)
        assert_close(experts(*args), unmerged)  # the merged weight alone carries the adapter
        layer.unmerge()
        assert torch.equal(experts.down_proj, original)  # bit-exact restore
        with pytest.warns(UserWarning, match="Already unmerged"):
            layer.unmerge()
        layer.merge()
        layer.enable_adapters(False)
        assert torch.equal(layer(*args), base_out)  # disabling unmerges
        assert not layer.merged and torch.equal(experts.down_proj, original)
        layer.enable_adapters(True)
        assert_close(layer(*args), unmerged)


def test_delete_adapter_and_zero_init():
    experts = fresh_experts("qwen3_moe")
    layer = S2FTExpertsLayer(experts, "default", random_indices())
    assert torch.equal(layer.s2ft_delta["default"], torch.zeros(E, H, K))
    assert layer.s2ft_delta["default"].dtype == experts.down_proj.dtype
    layer.update_layer("other", random_indices(2), init_weights=False)
    with pytest.warns(UserWarning, match="Setting active adapter to other"):
        layer.delete_adapter("default")
    assert "default" not in layer.s2ft_indices and "default" not in layer._index_master
    assert list(layer.s2ft_delta) == ["other"] and layer.active_adapters == ["other"]
    assert set(layer.state_dict()) >= {"s2ft_delta.other", "s2ft_indices.other"}


@pytest.mark.parametrize("how", ["init_empty_weights", "meta_device_context"])
def test_meta_device_construction(how):
    config, indices, experts_class = CONFIGS["mixtral"](), random_indices(), type(experts_of(tiny_model("mixtral")))
    if how == "init_empty_weights":  # how big-model loading builds the base model; wrapped outside the context
        with init_empty_weights():
            experts = experts_class(config)
        layer = S2FTExpertsLayer(experts, "default", indices, init_weights=True)
    else:
        with torch.device("meta"):
            layer = S2FTExpertsLayer(experts_class(config), "default", indices.tolist(), init_weights=True)
    assert layer.s2ft_delta["default"].is_meta and layer.s2ft_indices["default"].is_meta
    assert torch.equal(layer.selected("default"), indices)
    layer.to_empty(device="cpu")
    assert torch.equal(layer.s2ft_indices["default"], indices)
    assert torch.equal(layer.s2ft_delta["default"], torch.zeros(E, H, K))  # zero, not uninitialized memory


# --------------------------------------------------------------------------------------------------
# memory: what the extra term keeps for backward
def saved_during(fn, free: list[torch.Tensor]):
    """(output, Counter of (shape, dtype) of the NEW tensors saved for backward); tensors sharing storage with a
    parameter, buffer or input (which exist anyway) are not counted."""
    free_ptrs = {t.untyped_storage().data_ptr() for t in free}
    counted: Counter = Counter()

    def pack(t):
        if t.untyped_storage().data_ptr() not in free_ptrs:
            counted[(tuple(t.shape), t.dtype)] += 1
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, counted


def nbytes(counter: Counter) -> int:
    return sum(torch.Size(shape).numel() * dtype.itemsize * n for (shape, dtype), n in counter.items())


# routed (token, slot) pairs: T * TOP_K for routed families, E * T rows for Llama4's dense per-expert input
@pytest.mark.parametrize("family", FAMILIES)
def test_saves_only_selected_width(family):
    experts = fresh_experts(family, "eager")
    layer = wrap(experts)
    layer.update_layer("b", random_indices(seed=1, k=3), init_weights=False)
    layer.set_adapter(["default", "b"])
    _, _, args = Inputs(family).leaves()
    free = [*experts.parameters(), *layer.parameters(), *layer.buffers(), *args]
    _, base_saved = saved_during(lambda: experts(*args), free)
    _, all_saved = saved_during(lambda: layer(*args), free)
    assert not base_saved - all_saved  # the base module saves what it saves alone
    extra = all_saved - base_saved
    pairs = E * T if family == "llama4" else T * TOP_K
    # one packed [pairs, 2k] pre-activation tensor per active adapter, k = 5 and 3, fp32
    assert extra == Counter({((pairs, 2 * K), torch.float32): 1, ((pairs, 2 * 3), torch.float32): 1})
    assert nbytes(extra) == pairs * (2 * K + 2 * 3) * 4  # 1280 B routed, 2560 B Llama4
    assert not any(shape[-1] == FFN or shape == (T, H) for shape, _ in extra)
    # the base module alone saves 34720 B (eager Mixtral & co), 65440 B (GPT-OSS), 46080 B (Llama4): [.., I]-wide
    assert nbytes(base_saved) > 8 * nbytes(extra)
    print(f"{family}: base saves {nbytes(base_saved)} B, the two adapters {nbytes(extra)} B")


# --------------------------------------------------------------------------------------------------
# whole models
@pytest.mark.parametrize("family", FAMILIES)
def test_end_to_end_logits(family):
    model = copy.deepcopy(tiny_model(family))
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = model(ids).logits
        layers = []
        for i in range(len(model.model.layers)):
            block = model.model.layers[i]
            parent = block.feed_forward if hasattr(block, "feed_forward") else block.mlp
            layers.append(S2FTExpertsLayer(parent.experts, "default", random_indices(i), init_weights=True))
            parent.experts = layers[-1]
        assert torch.equal(model(ids).logits, base)  # zero delta: exactly the base model
        for layer in layers:
            layer.s2ft_delta["default"].normal_(std=0.5)
        adapted = model(ids).logits
        assert float((adapted - base).abs().max()) > 1e-3
        for layer in layers:
            layer.merge()
        assert_close(model(ids).logits, adapted, rel=1e-5)
        for layer in layers:
            layer.unmerge()
        for layer in layers:
            layer.enable_adapters(False)
        assert torch.equal(model(ids).logits, base)
    # training: only the deltas get gradients, and every layer's does
    for layer in layers:
        layer.enable_adapters(True)
    model.requires_grad_(False)
    for layer in layers:
        layer.set_adapter("default")
    model(ids).logits.square().mean().backward()
    assert all(float(layer.s2ft_delta["default"].grad.abs().max()) > 0 for layer in layers)
    assert all(p.grad is None for name, p in model.named_parameters() if "s2ft_" not in name)


def test_conventions():
    assert ExpertsLayout.from_module(fresh_experts("llama4")).convention == PER_EXPERT
    assert ExpertsLayout.from_module(fresh_experts("mixtral")).convention == ROUTED
