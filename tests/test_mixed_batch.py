"""Mixed-adapter batches: every row of `adapter_names=[...]` gets exactly what it gets alone with its adapter."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, build, load, main_output, sample_input_ids
from peft import get_peft_model
from torch import nn

from peft_s2ft import S2FTConfig, S2FTLayer
from peft_s2ft import mixed_batch as mixed_batch_module
from peft_s2ft.experts import S2FTExpertsLayer

ROWS = ["b", "__base__", "a", "b"]
PER_EXPERT_FAMILIES = {"llama4_text"}  # experts receive tokens already dispatched per expert: refused
# PEFT's modules_to_save wrapper mixes batches for Linear/Embedding/Conv modules only (as it does for LoRA), and
# RoBERTa's classifier is a two-layer head.
PEFT_REFUSES = {"roberta-seq-cls"}


def _two_adapters(base: nn.Module, task_type: str = "CAUSAL_LM", **second) -> nn.Module:
    model = get_peft_model(base, S2FTConfig(task_type=task_type, init_weights=False), adapter_name="a")
    model.add_adapter("b", S2FTConfig(task_type=task_type, init_weights=False, seed=1, **second))
    return model.eval()


@torch.no_grad()
def _alone(model: nn.Module, inputs: torch.Tensor, names: list[str], **kwargs) -> torch.Tensor:
    """Each row run on its own with its adapter set (or the adapters disabled for "__base__")."""
    outputs = []
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                outputs.append(main_output(model(inputs[row : row + 1], **kwargs)))
        else:
            model.set_adapter(name)
            outputs.append(main_output(model(inputs[row : row + 1], **kwargs)))
    return torch.cat(outputs)


def test_each_row_equals_that_row_alone_with_its_adapter(load):
    model = _two_adapters(load("llama-gqa"), train_v=True, train_up=True)  # b adds row deltas
    inputs = torch.randint(0, 64, (len(ROWS), 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mixed = model(inputs, adapter_names=ROWS).logits
    expected = _alone(model, inputs, ROWS)
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
    # the adapters really differ, so a row given the wrong one would fail the comparison above
    assert (expected[0] - expected[2]).abs().max() > 1e-3
    assert (expected[0] - expected[1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family(tmp_path, name):
    family = FAMILIES[name]
    base = load(build(name, tmp_path), name)
    model = _two_adapters(base, family.task_type)
    inputs = sample_input_ids(name, batch=len(ROWS), length=7)
    if name in PER_EXPERT_FAMILIES:
        with pytest.raises(ValueError, match="dispatched per expert"), torch.no_grad():
            model(inputs, adapter_names=ROWS)
        return
    if name in PEFT_REFUSES:
        with pytest.raises(TypeError, match="Mixed batching is only supported"), torch.no_grad():
            model(inputs, adapter_names=ROWS)
        return
    with torch.no_grad():
        mixed = main_output(model(inputs, adapter_names=ROWS))
    expected = _alone(model, inputs, ROWS)
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
    assert (expected[0] - expected[2]).abs().max() > 1e-4


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_with_one_adapter_per_row(load, num_beams):
    base = load("llama-gqa")
    with torch.no_grad():  # peaked next-token distributions: no near-ties for rounding to flip between beams
        base.lm_head.weight.mul_(30)
    model = _two_adapters(base)
    inputs = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(4))
    names = ["a", "__base__", "b"]
    settings = dict(max_new_tokens=5, do_sample=False, num_beams=num_beams, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=inputs, adapter_names=names, **settings)
        alone = []
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone.append(model.generate(input_ids=inputs[row : row + 1], **settings))
            else:
                model.set_adapter(name)
                alone.append(model.generate(input_ids=inputs[row : row + 1], **settings))
    assert torch.equal(mixed, torch.cat(alone))
    assert not torch.equal(alone[0], alone[2])


def test_permute_mode_mixes_its_adapter_with_the_base(load):
    model = get_peft_model(load("llama-gqa"), S2FTConfig(task_type="CAUSAL_LM", init_weights=False, permute=True))
    model.eval()
    inputs = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(5))
    names = ["default", "__base__", "default"]
    with torch.no_grad():
        mixed = model(inputs, adapter_names=names).logits
    torch.testing.assert_close(mixed, _alone(model, inputs, names), atol=1e-5, rtol=1e-5)


def test_the_frozen_matmul_runs_once_for_the_whole_batch_and_rows_are_grouped_once(load, monkeypatch):
    model = _two_adapters(load("llama-gqa"))
    layers = [m for m in model.modules() if isinstance(m, S2FTLayer)]
    calls = []
    for layer in layers:
        layer.base_layer.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    groupings = []
    original = mixed_batch_module.RowGroups.__init__

    def counting_init(self, names):
        groupings.append(list(names))
        original(self, names)

    monkeypatch.setattr(mixed_batch_module.RowGroups, "__init__", counting_init)
    with torch.no_grad():
        model(torch.zeros(len(ROWS), 5, dtype=torch.long), adapter_names=ROWS)
    assert calls == [len(ROWS)] * len(layers)
    assert len(groupings) == 1


def test_mixed_batches_on_experts_touch_only_their_rows(tmp_path):
    base = load(build("mixtral", tmp_path), "mixtral")
    model = _two_adapters(base)
    layer = next(m for m in model.modules() if isinstance(m, S2FTExpertsLayer))
    hidden = torch.randn(3 * 4, layer.hidden_size)  # 3 rows of 4 tokens, flattened as MoE blocks do
    top_k_index = torch.randint(0, layer.num_experts, (12, 2), generator=torch.Generator().manual_seed(0))
    top_k_weights = torch.rand(12, 2)
    groups = mixed_batch_module.RowGroups(["a", "__base__", "b"])
    with torch.no_grad():
        mixed = layer(hidden, top_k_index, top_k_weights, s2ft_row_groups=groups)
        base_out = layer.base_layer(hidden, top_k_index, top_k_weights)
        layer.set_adapter("a")
        with_a = layer(hidden, top_k_index, top_k_weights)
        layer.set_adapter("b")
        with_b = layer(hidden, top_k_index, top_k_weights)
    torch.testing.assert_close(mixed[:4], with_a[:4], atol=1e-6, rtol=1e-6)
    assert torch.equal(mixed[4:8], base_out[4:8])
    torch.testing.assert_close(mixed[8:], with_b[8:], atol=1e-6, rtol=1e-6)


def _pre_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize(
    ("prepare", "names", "error", "match"),
    [
        (lambda m: m.train(), ["a", "b"], ValueError, "training mode"),
        (lambda m: m.merge_adapter(["a"]), ["a", "b"], ValueError, "merged"),
        (lambda m: None, ["a", "typo"], ValueError, "non-existing adapter"),
        (lambda m: None, "a", TypeError, "one adapter name"),
        (lambda m: None, ["a", "b", "a"], ValueError, "3 entries"),
    ],
)
def test_refusals_are_clear_and_leave_no_hooks_behind(load, prepare, names, error, match):
    model = _two_adapters(load("llama-gqa"))
    prepare(model)
    hooks = _pre_hooks(model)
    inputs = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(error, match=match), torch.no_grad():
        model(inputs, adapter_names=names)
    assert _pre_hooks(model) == hooks
    model.eval()
    with torch.no_grad():
        model(inputs)  # and the model still runs as before


def test_the_hooks_are_removed_when_the_forward_raises(load):
    model = _two_adapters(load("llama-gqa"))
    hooks = _pre_hooks(model)
    with pytest.raises(IndexError), torch.no_grad():
        model(torch.full((2, 4), 10_000, dtype=torch.long), adapter_names=["a", "b"])  # out-of-vocabulary ids
    assert _pre_hooks(model) == hooks
