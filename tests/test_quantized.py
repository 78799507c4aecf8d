"""QS2FT: S2FT deltas on a quantized base (bitsandbytes nf4 and 8-bit, torchao int8 weight-only), the QLoRA
workflow: `prepare_model_for_kbit_training`, then `get_peft_model`. Each backend runs on a tiny random Llama."""

from __future__ import annotations

import gc
import importlib.util
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from examples_runner import run_example
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, MixtralConfig, TorchAoConfig

import peft_s2ft
from peft_s2ft import quantized
from peft_s2ft.layer import QuantizedS2FTLayer

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
BACKENDS = [
    pytest.param("nf4", marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed ([quant] extra)")),
    pytest.param("int8", marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed ([quant] extra)")),
    pytest.param(
        "torchao", marks=pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed ([quant] extra)")
    ),
]
FORMAT_NAMES = {"nf4": "bitsandbytes 4-bit", "int8": "bitsandbytes 8-bit", "torchao": "torchao"}
# A width bitsandbytes can block-quantize (blocks of 64) and repack for CPU inference (rows in blocks of 32).
TINY = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def quantization_config(backend: str):
    if backend == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    if backend == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama-quant")
    AutoModelForCausalLM.from_config(LlamaConfig(**TINY)).save_pretrained(path)
    return str(path)


def load_quantized(path: str, backend: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization_config(backend))


def qs2ft(path: str, backend: str, **config) -> PeftModel:
    model = prepare_model_for_kbit_training(load_quantized(path, backend))
    defaults = dict(task_type="CAUSAL_LM", heads_per_layer=1, channels_per_layer=8, init_weights=False)
    return get_peft_model(model, peft_s2ft.S2FTConfig(**{**defaults, **config}))


def quantized_layers(model: nn.Module) -> dict[str, QuantizedS2FTLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedS2FTLayer)}


def storage_bytes(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every tensor that holds a linear layer's quantized weight (data, scales, quantization state)."""
    weight = module.weight
    found = {"data": weight.data} if type(weight.data) is torch.Tensor else {}
    state = getattr(weight, "quant_state", None)
    if state is not None:  # bitsandbytes 4-bit
        found |= {f"state.{k}": v for k, v in state.as_dict(packed=True).items() if isinstance(v, torch.Tensor)}
    for name in ("CB", "SCB"):  # bitsandbytes 8-bit: on the parameter until the first forward moves them to the state
        value = getattr(weight, name, None)
        value = getattr(getattr(module, "state", None), name, None) if value is None else value
        if isinstance(value, torch.Tensor):
            found[name] = value
    if hasattr(weight, "__tensor_flatten__") and type(weight) not in (torch.Tensor, nn.Parameter):  # torchao
        names, _ = weight.__tensor_flatten__()
        found |= {f"inner.{n}": getattr(weight, n) for n in names}
    return {k: v.detach().clone() for k, v in found.items()}


def quantized_storage(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Per quantized linear layer (named as in the base model, wrapped or not), its storage."""
    return {
        name.removeprefix("base_model.model.").replace(".base_layer", ""): storage_bytes(m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, QuantizedS2FTLayer) and name.split(".")[-1] != "lm_head"
    }


def assert_same_storage(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name
        for key, tensor in before[name].items():
            assert torch.equal(tensor, after[name][key]), f"{name}: {key} changed"


@pytest.mark.parametrize("backend", BACKENDS)
def test_get_peft_model_after_kbit_preparation_wraps_the_quantized_layers(tiny_dir, backend):
    model = qs2ft(tiny_dir, backend)
    layers = quantized_layers(model)
    assert sorted(n.rsplit(".", 1)[-1] for n in layers) == ["down_proj", "down_proj", "o_proj", "o_proj"]
    for layer in layers.values():
        assert layer.quantization.name == FORMAT_NAMES[backend]
        assert layer.s2ft_delta["default"].dtype == torch.float32
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".s2ft_delta." in n for n in trainable)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_changes_only_the_deltas_and_never_the_quantized_storage(tiny_dir, backend):
    model = qs2ft(tiny_dir, backend).train()
    storage = quantized_storage(model)
    frozen = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if not p.requires_grad and type(p) is nn.Parameter and p.dtype in quantized.PLAIN_DTYPES  # not quantized
    }
    deltas = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, before in deltas.items():
        assert not torch.equal(before, dict(model.named_parameters())[name].detach()), name
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(frozen[name], p.detach()), name
    assert_same_storage(storage, quantized_storage(model))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_gives_the_gradients_of_the_plain_step(tiny_dir, backend, reentrant):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = prepare_model_for_kbit_training(load_quantized(tiny_dir, backend), use_gradient_checkpointing=False)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        config = peft_s2ft.S2FTConfig(
            task_type="CAUSAL_LM", heads_per_layer=1, channels_per_layer=8, init_weights=False
        )
        torch.manual_seed(0)  # the same random initial deltas (init_weights=False) in both models
        model = get_peft_model(model, config).train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)


def _layer_and_input(tiny_dir, backend, seed=0):
    model = qs2ft(tiny_dir, backend).train()
    layer = quantized_layers(model)["base_model.model.model.layers.1.mlp.down_proj"]
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(seed))
    return model, layer, x


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_is_the_quantized_layer_plus_the_selected_columns_times_the_delta(tiny_dir, backend):
    _, layer, x = _layer_and_input(tiny_dir, backend)
    S, D = layer.s2ft_indices["default"], layer.s2ft_delta["default"]
    with torch.no_grad():
        base = layer.base_layer(x)
        torch.testing.assert_close(layer(x), base + x[..., S] @ D.t(), rtol=1e-6, atol=1e-6)
        # and the quantized layer computes with the weight S2FT dequantizes (8-bit also quantizes activations)
        reference = F.linear(x, layer.dequantized_weight().float(), layer.base_layer.bias)
        tolerance = 3e-2 if backend == "int8" else 1e-4
        torch.testing.assert_close(base, reference, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_those_of_the_dequantized_weight_plus_the_delta(tiny_dir, backend):
    _, layer, x = _layer_and_input(tiny_dir, backend)
    S, D = layer.s2ft_indices["default"], layer.s2ft_delta["default"]
    x = x.requires_grad_(True)
    grad_out = torch.randn(3, 5, layer.out_features, generator=torch.Generator().manual_seed(1))
    (layer(x) * grad_out).sum().backward()
    reference_delta = D.detach().clone().requires_grad_(True)
    reference_x = x.detach().clone().requires_grad_(True)
    weight = layer.dequantized_weight().float().index_add(1, S, reference_delta)
    (F.linear(reference_x, weight) * grad_out).sum().backward()
    torch.testing.assert_close(D.grad, reference_delta.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_keeps_only_the_selected_input_columns(tiny_dir, backend):
    _, layer, x = _layer_and_input(tiny_dir, backend)
    S = layer.s2ft_indices["default"]
    saved = []
    x.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        h = x * 1.0  # not a leaf, so only what the layer saves could keep it
        out = layer(h)
    params = {id(p) for p in layer.parameters()} | {id(b) for b in layer.buffers()}
    activations = [t for t in saved if id(t) not in params]
    assert [tuple(t.shape) for t in activations] == [(15, len(S))]
    # Nothing else holds the input either (bitsandbytes' 8-bit matmul keeps it on its context, out of sight of the
    # hooks): once the caller drops it, it is freed while the graph lives on.
    alive = weakref.ref(h)
    del h
    gc.collect()
    assert alive() is None
    out.sum().backward()


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed ([quant] extra)")
def test_the_bnb_8bit_layer_alone_would_keep_the_whole_input(tiny_dir):
    """Why the quantized layer's own autograd is not used: the control for the test above."""
    _, layer, x = _layer_and_input(tiny_dir, "int8")
    h = x.reshape(-1, x.shape[-1]).requires_grad_(True) * 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = layer.base_layer(h)
    alive = weakref.ref(h)
    del h
    gc.collect()
    assert alive() is not None
    del out


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_and_reload_onto_a_fresh_quantized_base(tiny_dir, backend, tmp_path):
    model = qs2ft(tiny_dir, backend).eval()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_quantized(tiny_dir, backend), tmp_path / "adapter").eval()
    assert sorted(quantized_layers(reloaded)) == sorted(quantized_layers(model))
    for name, layer in quantized_layers(reloaded).items():
        assert torch.equal(layer.s2ft_indices["default"], quantized_layers(model)[name].s2ft_indices["default"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def requantized_reference(backend: str, values: torch.Tensor, layer) -> torch.Tensor:
    """`values` quantized and dequantized by the library's own functional API, as the merged weight must be."""
    if backend == "nf4":
        import bitsandbytes.functional as bf

        weight = layer.base_layer.weight
        packed, state = bf.quantize_4bit(
            values, blocksize=weight.blocksize, compress_statistics=weight.compress_statistics, quant_type="nf4"
        )
        return bf.dequantize_4bit(packed, state)
    if backend == "int8":
        import bitsandbytes.functional as bf

        rows, scales, _ = bf.int8_vectorwise_quant(values.to(torch.float16))
        return rows.float() * (scales.float() / 127).unsqueeze(1)
    from torchao.quantization import Int8Tensor, PerRow

    return Int8Tensor.from_hp(values, PerRow()).dequantize()


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_requantizes_with_a_warning_and_unmerge_restores_the_storage_exactly(tiny_dir, backend):
    model, layer, x = _layer_and_input(tiny_dir, backend)
    storage = quantized_storage(model)
    original = {name: (q.base_layer.weight, q.dequantized_weight()) for name, q in quantized_layers(model).items()}
    with pytest.warns(UserWarning, match="requantizes the whole weight"):
        model.merge_adapter()
    for name, merged_layer in quantized_layers(model).items():
        S, D = merged_layer.s2ft_indices["default"], merged_layer.s2ft_delta["default"].detach()
        expected = original[name][1].float().index_add(1, S, D)
        merged = merged_layer.dequantized_weight().float()
        torch.testing.assert_close(merged, requantized_reference(backend, expected, merged_layer).float())
        assert not torch.equal(merged, original[name][1].float())
    with torch.no_grad():
        merged_out = layer(x)  # the merged quantized layer alone
    model.unmerge_adapter()
    for name, unmerged_layer in quantized_layers(model).items():
        assert unmerged_layer.base_layer.weight is original[name][0]
    assert_same_storage(storage, quantized_storage(model))
    with torch.no_grad():
        S, D = layer.s2ft_indices["default"], layer.s2ft_delta["default"]
        unmerged_out = layer(x)
        torch.testing.assert_close(unmerged_out, layer.base_layer(x) + x[..., S] @ D.t())
        assert (merged_out - unmerged_out).abs().max() < 0.2 * unmerged_out.abs().max()  # rounding, not a lost delta


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_and_unload_gives_the_plain_quantized_model_with_the_merged_weights(tiny_dir, backend):
    model = qs2ft(tiny_dir, backend).eval()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
        with torch.no_grad():
            merged = model(input_ids=ids).logits
        model.unmerge_adapter()
        plain = model.merge_and_unload()
    assert not quantized_layers(plain)
    assert type(plain.model.layers[0].mlp.down_proj) is type(plain.model.layers[0].mlp.up_proj)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, merged, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_safe_merge_of_a_broken_delta_raises_and_leaves_the_storage(tiny_dir, backend):
    model = qs2ft(tiny_dir, backend)
    storage = quantized_storage(model)
    layer = next(iter(quantized_layers(model).values()))
    with torch.no_grad():
        layer.s2ft_delta["default"][0, 0] = float("nan")
    with warnings.catch_warnings(), pytest.raises(ValueError, match="NaNs detected"):
        warnings.simplefilter("ignore")
        model.merge_adapter(safe_merge=True)
    assert not layer.merged
    assert_same_storage(storage, quantized_storage(model))


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed ([quant] extra)")
def test_the_default_budget_counts_the_weights_a_4bit_parameter_packs(tiny_dir):
    """A 4-bit parameter's numel() is half its weights; the budget (trainable_ratio) must not shrink with it."""
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), peft_s2ft.S2FTConfig(task_type="CAUSAL_LM"))
    quantized = get_peft_model(
        prepare_model_for_kbit_training(load_quantized(tiny_dir, "nf4")), peft_s2ft.S2FTConfig(task_type="CAUSAL_LM")
    )

    def counts(model):
        return {n: p.shape for n, p in model.named_parameters() if p.requires_grad}

    assert counts(quantized) == counts(plain)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_selection_reads_the_dequantized_weights(tiny_dir, backend):
    model = qs2ft(tiny_dir, backend, selection="weight_large", init_weights=True)
    for name, layer in quantized_layers(model).items():
        width = 16 if name.endswith("o_proj") else 1  # a head's columns, or one channel
        norms = layer.dequantized_weight().float().reshape(layer.out_features, -1, width).norm(dim=(0, 2))
        top = norms.topk(len(layer.s2ft_indices["default"]) // width).indices.sort().values
        assert torch.equal(layer.s2ft_indices["default"].reshape(-1, width)[:, 0] // width, top), name


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed ([quant] extra)")
def test_calibrated_selection_on_a_4bit_base(tiny_dir):
    """calibrate_selection runs the model in eval mode, where bitsandbytes may repack 4-bit weights for CPU
    inference; the weight-times-activation scores and the weight check read them either way."""
    model = prepare_model_for_kbit_training(load_quantized(tiny_dir, "nf4"))
    config = peft_s2ft.S2FTConfig(
        task_type="CAUSAL_LM", selection="weight_activation_large", heads_per_layer=1, channels_per_layer=8
    )
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    peft_s2ft.calibrate_selection(model, config, [{"input_ids": ids}], progress=False)
    peft_model = get_peft_model(model, config)
    assert len(quantized_layers(peft_model)) == 4


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed ([quant] extra)")
def test_a_4bit_weight_repacked_for_cpu_inference_is_still_read_and_merged(tiny_dir):
    model = qs2ft(tiny_dir, "nf4")
    layer = quantized_layers(model)["base_model.model.model.layers.0.self_attn.o_proj"]
    before = layer.dequantized_weight()
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    if not getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16; this one did not")
    # the repacked absmax is bf16: the same weights up to its rounding
    torch.testing.assert_close(layer.dequantized_weight(), before, rtol=2**-8, atol=1e-6)
    x = torch.randn(2, layer.in_features)
    with torch.no_grad():
        unmerged = layer(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.merge_adapter()
        assert (layer(x) - unmerged).abs().max() < 0.2 * unmerged.abs().max()
        model.unmerge_adapter()
        torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed ([quant] extra)")
def test_training_after_bitsandbytes_repacked_the_4bit_weights_for_cpu_inference_is_refused(tiny_dir):
    """A repacked bitsandbytes 4-bit layer passes no gradient to its input (bitsandbytes 0.50), which would make
    every gradient below it wrong without a word; the training forward refuses instead."""
    model = qs2ft(tiny_dir, "nf4")
    ids = torch.tensor([[1, 2, 3, 4]])
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    if not getattr(q_proj.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16; this one did not")
    x = torch.randn(2, q_proj.in_features, requires_grad=True)
    q_proj.train()
    q_proj(x).sum().backward()
    assert x.grad is None  # the reason: no input gradient through the repacked layer
    model.train()
    with pytest.raises(RuntimeError, match="repacked the 4-bit weight of 'model.layers.0.self_attn.q_proj'"):
        model(input_ids=ids, labels=ids)
    with torch.no_grad():
        model(input_ids=ids)  # serving is unaffected


@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed ([quant] extra)")
def test_paca_trains_columns_of_every_4bit_linear_layer(tiny_dir):
    model = get_peft_model(
        prepare_model_for_kbit_training(load_quantized(tiny_dir, "nf4")),
        peft_s2ft.PaCAConfig(r=4, task_type="CAUSAL_LM"),
    )
    assert len(quantized_layers(model)) == 2 * 7
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(layer.s2ft_delta["default"].grad is not None for layer in quantized_layers(model).values())


# ----------------------------------------------------------------------------------------------------------------
# refusals
@pytest.mark.parametrize("backend", BACKENDS)
def test_permute_mode_is_refused_on_a_quantized_base(tiny_dir, backend):
    model = prepare_model_for_kbit_training(load_quantized(tiny_dir, backend))
    with pytest.raises(ValueError, match="permute=True .* quantized"):
        get_peft_model(model, peft_s2ft.S2FTConfig(task_type="CAUSAL_LM", permute=True))
    assert not quantized_layers(model)


def test_a_weight_of_an_unknown_quantized_storage_is_refused(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    down = model.model.layers[0].mlp.down_proj
    down.weight = nn.Parameter(down.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        get_peft_model(model, peft_s2ft.S2FTConfig(task_type="CAUSAL_LM"))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear


def test_quantized_fused_experts_are_refused():
    config = MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    model = AutoModelForCausalLM.from_config(config)
    experts = model.model.layers[0].mlp.experts
    experts.down_proj = nn.Parameter(experts.down_proj.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="fused experts.*quantized"):
        get_peft_model(model, peft_s2ft.S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=1, channels_per_layer=2))
    assert type(model.model.layers[0].mlp.experts) is type(experts)


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed ([quant] extra)")
def test_a_trainable_quantized_weight_is_refused_at_the_forward(tiny_dir):
    model, layer, x = _layer_and_input(tiny_dir, "torchao")
    layer.base_layer.weight.requires_grad_(True)  # torchao's tensor reports a float dtype, so torch allows it
    with pytest.raises(ValueError, match="cannot be trained"):
        layer(x)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed ([quant] extra)")
def test_the_qs2ft_example_runs_on_the_embedded_model(tmp_path):
    out = run_example("qs2ft_train.py", tmp_path / "adapter", "--batch-size", "1")
    assert "reloaded onto a fresh 4-bit base: 60 QS2FT layers" in out  # O and down of 30 layers
