"""Permute mode against the default mode: same gradients in every call sequence, one compiled graph, cheap saves."""

from __future__ import annotations

import os

import pytest
import torch
from peft import get_peft_model
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, LlamaConfig

from peft_s2ft import S2FTConfig

MODES = [False, True]


def _pair(load, **kwargs):
    """The same adapter (same selection, same initial delta) in both modes: MHA, so no group constraint."""
    models = {}
    for permute in MODES:
        torch.manual_seed(0)
        config = S2FTConfig(task_type="CAUSAL_LM", permute=permute, init_weights=False, **kwargs)
        models[permute] = get_peft_model(load("llama-mha"), config).train()
    return models


def _dense_grads(model) -> dict[str, torch.Tensor]:
    """Each delta's gradient scattered to the original coordinates, so both modes can be compared."""
    grads = {}
    for name, module in model.named_modules():
        if hasattr(module, "s2ft_delta"):
            grad = module.s2ft_delta["default"].grad
            dense = torch.zeros(module.out_features, module.in_features)
            dim = 1 if module.axis == "in" else 0  # columns or rows
            grads[name] = dense.index_copy_(dim, module.s2ft_indices["default"], grad)
    return grads


@pytest.mark.parametrize("train_rows", [False, True])
def test_reference_forward_between_forward_and_backward_gives_the_default_modes_gradients(load, input_ids, train_rows):
    # DPO with ref_model=None: policy forward, reference forward with the adapter disabled, then backward.
    grads = {}
    for permute, model in _pair(load, heads_per_layer=2, channels_per_layer=3, train_v=train_rows).items():
        policy = model(input_ids).logits
        with model.disable_adapter():
            reference = model(input_ids).logits
        loss = torch.nn.functional.logsigmoid(policy - reference.detach()).mean()
        loss.backward()
        grads[permute] = _dense_grads(model)
    assert grads[False].keys() == grads[True].keys()
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("permute", MODES)
def test_compiles_to_one_graph_with_the_eager_gradients(load, input_ids, permute):
    torch._dynamo.reset()
    model = _pair(load, heads_per_layer=2, channels_per_layer=3)[permute]
    eager_loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    eager_loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: any graph break raises
    loss = compiled(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, eager[name])
    torch._dynamo.reset()


@pytest.mark.parametrize("through", ["PeftModel", "transformers"])
@pytest.mark.parametrize("permute", MODES)
def test_saving_allocates_no_more_than_the_adapter(tmp_path, permute, through):
    config = LlamaConfig(
        vocab_size=64, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(base, S2FTConfig(task_type="CAUSAL_LM", permute=permute, heads_per_layer=1))
    if through == "transformers":  # an adapter injected into the transformers model, saved by transformers
        model.save_pretrained(tmp_path / "source")
        model = AutoModelForCausalLM.from_config(config)
        model.load_adapter(str(tmp_path / "source"), adapter_name="default")
    model.save_pretrained(tmp_path)  # first save: folder, model card
    adapter_bytes = os.path.getsize(tmp_path / "adapter_model.safetensors")
    permuted_weight_bytes = 2 * (4 * 256 * 256 + 3 * 256 * 1024) * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        model.save_pretrained(tmp_path)
    allocated = sum(event.cpu_memory_usage for event in recorded.events() if event.cpu_memory_usage > 0)
    assert allocated <= adapter_bytes < permuted_weight_bytes / 20
