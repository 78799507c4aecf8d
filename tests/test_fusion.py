"""Fusion: add_weighted_adapter on the union of selections, selection overlap, and disjoint selections."""

from __future__ import annotations

import pytest
import torch
from families import build
from families import load as load_family
from peft import PeftModel, get_peft_model
from peft.utils import merge_utils

import peft_s2ft
from peft_s2ft import S2FTConfig
from peft_s2ft.layer import S2FTTunerLayer
from peft_s2ft.overlap import selected_units


def _pair(base, task_type="CAUSAL_LM", first=None, second=None):
    model = get_peft_model(base, S2FTConfig(task_type=task_type, init_weights=False, **(first or {})), "a")
    model.add_adapter("b", S2FTConfig(task_type=task_type, init_weights=False, seed=1, **(second or {})))
    return model.eval()


def _layers(model):
    return {path: m for path, m in model.base_model.model.named_modules() if isinstance(m, S2FTTunerLayer)}


def _dense(layer, name):
    return layer.get_delta_weight(name) if name in layer.s2ft_delta else 0


def _logits(model, adapters, inputs):
    model.base_model.set_adapter(adapters)
    with torch.no_grad():
        return model(inputs).logits


def test_linear_is_the_exact_weighted_sum_and_unshared_columns_keep_their_delta(load):
    model = _pair(load("llama-gqa"), second={"train_v": True, "train_up": True})
    model.add_weighted_adapter(["a", "b"], [0.7, -1.3], "fused")
    shared_somewhere = False
    for path, layer in _layers(model).items():
        expected = 0.7 * _dense(layer, "a") + (-1.3) * _dense(layer, "b")
        torch.testing.assert_close(layer.get_delta_weight("fused"), expected, atol=1e-6, rtol=0)
        fused_index = layer.selected("fused").tolist()
        indices = {n: layer.selected(n).tolist() for n in ("a", "b") if n in layer.s2ft_delta}
        for name, weight in (("a", 0.7), ("b", -1.3)):
            if name not in indices:
                continue
            others = set().union(*(set(v) for n, v in indices.items() if n != name))
            shared_somewhere |= bool(others & set(indices[name]))
            for position, column in enumerate(indices[name]):
                if column in others:
                    continue
                fused_column = layer.s2ft_delta["fused"].select(layer.dim, fused_index.index(column))
                own = layer.s2ft_delta[name].select(layer.dim, position)
                assert torch.equal(fused_column, weight * own), path  # exactly, not approximately
    assert shared_somewhere  # the test covers overlapping columns too


def test_fused_logits_equal_both_adapters_active_and_survive_save_and_load(load, model_dirs, tmp_path):
    model = _pair(load("llama-gqa"), first={"layers_to_transform": [0]}, second={"layers_to_transform": [1]})
    inputs = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    both = _logits(model, ["a", "b"], inputs)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "fused")
    fused = _logits(model, "fused", inputs)
    torch.testing.assert_close(fused, both, atol=1e-5, rtol=1e-5)
    assert (fused - _logits(model, "a", inputs)).abs().max() > 1e-3
    model.save_pretrained(tmp_path, selected_adapters=["fused"])
    reloaded = PeftModel.from_pretrained(load("llama-gqa"), tmp_path / "fused").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(inputs).logits, fused, atol=1e-6, rtol=1e-6)


def test_the_fused_adapter_is_frozen_and_the_active_adapter_stays(load):
    model = _pair(load("llama-gqa"))
    model.set_adapter("a")
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "fused")
    assert model.active_adapters == ["a"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".fused" in n)


@pytest.mark.parametrize("combination", ["ties", "magnitude_prune", "dare_linear"])
def test_merge_utils_run_on_shared_columns_only(load, combination):
    model = _pair(load("llama-gqa"), first={"channels_per_layer": 20}, second={"channels_per_layer": 20})
    density = 1.0 if combination == "dare_linear" else 0.3  # DARE is random; at density 1 it must equal linear
    model.add_weighted_adapter(["a", "b"], [0.6, 0.9], "fused", combination_type=combination, density=density)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    a, b = layer.selected("a").tolist(), layer.selected("b").tolist()
    shared = sorted(set(a) & set(b))
    assert shared and set(a) - set(b)
    fused_index = layer.selected("fused").tolist()
    assert fused_index == sorted(set(a) | set(b))
    fused = layer.s2ft_delta["fused"].detach()
    parts = [layer.s2ft_delta[n].detach()[:, [idx.index(c) for c in shared]] for n, idx in (("a", a), ("b", b))]
    weights = torch.tensor([0.6, 0.9])
    if combination == "dare_linear":
        expected = merge_utils.task_arithmetic(parts, weights)
    else:
        expected = getattr(merge_utils, combination)(parts, weights, density)
    torch.testing.assert_close(fused[:, [fused_index.index(c) for c in shared]], expected, atol=1e-6, rtol=0)
    only_a = [c for c in a if c not in shared]
    torch.testing.assert_close(
        fused[:, [fused_index.index(c) for c in only_a]],
        0.6 * layer.s2ft_delta["a"].detach()[:, [a.index(c) for c in only_a]],
        atol=0,
        rtol=0,
    )


def test_experts_fuse_per_expert(tmp_path):
    base = load_family(build("mixtral", tmp_path / "m"), "mixtral")
    model = _pair(base)
    inputs = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    both = _logits(model, ["a", "b"], inputs)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "fused")
    torch.testing.assert_close(_logits(model, "fused", inputs), both, atol=1e-5, rtol=1e-5)
    experts = next(m for m in _layers(model).values() if isinstance(m, peft_s2ft.S2FTExpertsLayer))
    expected = experts.get_delta_weight("a") + experts.get_delta_weight("b")
    torch.testing.assert_close(experts.get_delta_weight("fused"), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((["a", "nope"], [1.0, 1.0], "f"), {}, "do not exist"),
        ((["a", "b"], [1.0], "f"), {}, "one finite number per adapter"),
        ((["a", "b"], [1.0, float("nan")], "f"), {}, "one finite number per adapter"),
        ((["a", "b"], [1.0, 1.0], "b"), {}, "already exists"),
        ((["a", "b"], [1.0, 1.0], "f"), {"combination_type": "svd"}, "not available for S2FT"),
        ((["a", "b"], [1.0, 1.0], "f"), {"combination_type": "cat"}, "exact weighted sum"),
        ((["a", "b"], [1.0, 1.0], "f"), {"combination_type": "ties"}, "needs a `density`"),
        ((["a", "a"], [1.0, 1.0], "f"), {}, "distinct adapter names"),
    ],
)
def test_bad_requests_raise_and_change_nothing(load, args, kwargs, match):
    model = _pair(load("llama-gqa"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(*args, **kwargs)
    assert set(model.peft_config) == {"a", "b"}
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_adapters_with_modules_to_save_are_refused(tmp_path):
    base = load_family(build("bert-seq-cls", tmp_path / "b"), "bert-seq-cls")
    model = _pair(base, task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="modules_to_save"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "fused")


def test_selection_overlap_counts_shared_units(load):
    model = _pair(load("llama-mha"), first={"heads_per_layer": 2}, second={"heads_per_layer": 2})
    overlap = peft_s2ft.selection_overlap(model, "a", "b")
    structure = peft_s2ft.architectures.describe(model.base_model.model)
    layers = _layers(model)
    units = {
        name: selected_units(structure, {p: m.selected(name) for p, m in layers.items() if name in m.s2ft_delta})
        for name in ("a", "b")
    }
    shared = sum(len(units["a"].blocks[k] & units["b"].blocks.get(k, set())) for k in units["a"].blocks)
    assert overlap["shared"] == shared
    assert overlap["units_a"] == sum(len(v) for v in units["a"].blocks.values())
    itself = peft_s2ft.selection_overlap(model, "a", "a")
    assert itself["shared"] == itself["units_a"] and itself["jaccard"] == 1.0


def test_disjoint_from_an_adapter_on_the_model_and_a_saved_one(load, tmp_path):
    model = get_peft_model(load("llama-mha"), S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=2), "a")
    model.add_adapter("b", S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=2, disjoint_from=["a"]))
    assert peft_s2ft.selection_overlap(model, "a", "b")["shared"] == 0
    model.save_pretrained(tmp_path, selected_adapters=["a"])
    saved = str(tmp_path / "a")  # PEFT saves an adapter that is not "default" in a subfolder of its name
    fresh = get_peft_model(
        load("llama-mha"), S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=2, disjoint_from=[saved]), "c"
    )
    overlap = peft_s2ft.selection_overlap(fresh, "c", saved)
    assert overlap["shared"] == 0 and overlap["units_a"] == overlap["units_b"] > 0


def test_disjoint_weight_selection_takes_the_best_free_units(load):
    config = dict(task_type="CAUSAL_LM", selection="weight_large", heads_per_layer=1, channels_per_layer=5)
    model = get_peft_model(load("llama-mha"), S2FTConfig(**config), "a")
    model.add_adapter("b", S2FTConfig(**config, disjoint_from=["a"]))
    down = model.base_model.model.model.layers[0].mlp.down_proj
    norms = down.base_layer.weight.detach().norm(dim=0)
    ranked = torch.argsort(norms, descending=True).tolist()
    assert down.selected("a").tolist() == sorted(ranked[:5])
    assert down.selected("b").tolist() == sorted(ranked[5:10])


def test_disjoint_from_refuses_what_cannot_fit_or_be_found(load):
    model = get_peft_model(load("llama-mha"), S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=3), "a")
    with pytest.raises(ValueError, match="leaves 1 heads free"):
        model.add_adapter("b", S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=2, disjoint_from=["a"]))
    with pytest.raises(ValueError, match="neither an S2FT adapter on this model"):
        model.add_adapter("c", S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=1, disjoint_from=["typo"]))
    assert set(model.peft_config) == {"a"}
