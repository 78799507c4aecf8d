"""Hot-swapping S2FT adapters in place (peft_s2ft/hotswap.py): a swap gives exactly what loading the new adapter onto
a fresh base gives, keeps every adapter tensor's identity, shape and storage, works merged (bit-exact on the base),
runs a compiled model without recompiling, and a refused swap or preparation leaves the model as it was."""

from __future__ import annotations

import shutil

import huggingface_hub
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_s2ft import S2FTConfig
from peft_s2ft.checkpoint import AdapterMismatchError
from peft_s2ft.experts import S2FTExpertsLayer
from peft_s2ft.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from peft_s2ft.layer import S2FTLayer, S2FTTunerLayer
from tests import families
from tests.snapshots import assert_same_snapshot, model_snapshot

ADAPTER_FILE = "adapter_model.safetensors"
FIRST = dict(seed=0, heads_per_layer=3, channels_per_layer=6, train_v=True, train_up=True)
# New adapters the first one has room for, each differing from it in another way.
FITTING = {
    "other seed": dict(seed=3, heads_per_layer=2, channels_per_layer=6, train_v=True, train_up=True),
    "fewer units": dict(seed=4, heads_per_layer=1, channels_per_layer=3, train_v=True, train_up=True),
    "no value or up rows": dict(seed=5, heads_per_layer=2, channels_per_layer=4),
    "one layer only": dict(seed=6, heads_per_layer=1, channels_per_layer=2, layers_to_transform=[1]),
}


def _save(load, path, model_name="llama-gqa", **config):
    """An adapter with random (non-zero) deltas, saved to `path`."""
    model = get_peft_model(load(model_name), S2FTConfig(task_type="CAUSAL_LM", init_weights=False, **config))
    model.save_pretrained(path)
    return path


def _logits(model, input_ids) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits.detach()


def _reference(load, path, input_ids, merged=False, model_name="llama-gqa") -> torch.Tensor:
    """What PeftModel.from_pretrained on a fresh base gives for the adapter at `path`."""
    model = PeftModel.from_pretrained(load(model_name), path)
    if merged:
        model.merge_adapter()
    return _logits(model, input_ids)


def _adapter_tensors(model) -> dict[str, tuple]:
    """Identity, storage, shape, dtype and device of every adapter tensor (and the CPU index copies)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, S2FTTunerLayer):
            for adapter in module.s2ft_delta:
                for kind, tensor in (
                    ("delta", module.s2ft_delta[adapter]),
                    ("indices", module.s2ft_indices[adapter]),
                    ("master", module._index_master[adapter]),
                ):
                    found[f"{name}.{kind}.{adapter}"] = (
                        id(tensor),
                        tensor.data_ptr(),
                        tuple(tensor.shape),
                        tensor.dtype,
                        tensor.device,
                    )
    return found


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "s2ft_" not in n}


def _assert_same_base(model, weights) -> None:
    for name, param in model.named_parameters():
        if name in weights:
            assert torch.equal(param, weights[name]), name


# --------------------------------------------------------------------------------------------------
# swaps into an adapter that has room
@pytest.mark.parametrize("variant", list(FITTING))
def test_a_swap_gives_the_new_adapters_outputs_and_keeps_every_tensor(load, input_ids, tmp_path, variant):
    first = _save(load, tmp_path / "first", **FIRST)
    new = _save(load, tmp_path / "new", **FITTING[variant])
    model = PeftModel.from_pretrained(load(), first)
    before_swap = _logits(model, input_ids)
    tensors = _adapter_tensors(model)
    expected = _reference(load, new, input_ids)
    assert not torch.allclose(before_swap, expected)  # else the comparison below would prove nothing

    hotswap_adapter(model, str(new), adapter_name="default")

    torch.testing.assert_close(_logits(model, input_ids), expected, atol=1e-6, rtol=0)
    assert _adapter_tensors(model) == tensors
    config = model.peft_config["default"]
    for field, value in FITTING[variant].items():
        assert getattr(config, field) == value, field
    assert config.inference_mode and not config.permute  # how the model holds the adapter did not change


def test_a_swapped_and_saved_adapter_reloads_to_the_same_outputs(load, input_ids, tmp_path):
    # Padding uses whole heads/channels, so the saved (padded) selection passes the whole-unit check on loading.
    first = _save(load, tmp_path / "first", **FIRST)
    new = _save(load, tmp_path / "new", **FITTING["fewer units"])
    model = PeftModel.from_pretrained(load(), first)
    hotswap_adapter(model, new)
    model.save_pretrained(tmp_path / "saved")
    widths = {k: v.shape for k, v in load_file(tmp_path / "saved" / ADAPTER_FILE).items() if "o_proj.s2ft_indices" in k}
    assert widths and all(shape == (24,) for shape in widths.values())
    torch.testing.assert_close(_reference(load, tmp_path / "saved", input_ids), _reference(load, new, input_ids))


def test_swapping_back_and_forth_with_other_adapters_present(load, input_ids, tmp_path):
    first = _save(load, tmp_path / "first", **FIRST)
    new = _save(load, tmp_path / "new", **FITTING["fewer units"])
    model = PeftModel.from_pretrained(load(), first)
    model.load_adapter(_save(load, tmp_path / "other", seed=9), adapter_name="other")
    other_before = {n: t.clone() for n, t in model.state_dict().items() if n.endswith(".other")}
    expected = {path: _reference(load, path, input_ids) for path in (first, new)}
    for path in (new, first, new):
        hotswap_adapter(model, path)
        torch.testing.assert_close(_logits(model, input_ids), expected[path], atol=1e-6, rtol=0)
    for name, tensor in model.state_dict().items():
        if name.endswith(".other"):
            assert torch.equal(tensor, other_before[name]), name


# --------------------------------------------------------------------------------------------------
# merged
def test_a_merged_swap_merges_the_new_adapter_and_cycles_are_bit_exact_on_the_base(load, input_ids, tmp_path):
    first = _save(load, tmp_path / "first", **FIRST)
    new = _save(load, tmp_path / "new", **FITTING["fewer units"])
    model = PeftModel.from_pretrained(load(), first)
    base = _base_weights(model)
    expected = {path: _reference(load, path, input_ids, merged=True) for path in (first, new)}
    model.merge_adapter()
    for path in (new, first, new, first):
        hotswap_adapter(model, path)
        assert all("default" in m.merged_adapters for m in model.modules() if isinstance(m, S2FTLayer))
        assert torch.equal(_logits(model, input_ids), expected[path])
    model.unmerge_adapter()
    _assert_same_base(model, base)
    torch.testing.assert_close(_logits(model, input_ids), _reference(load, first, input_ids), atol=1e-6, rtol=0)


def test_a_merged_swap_with_another_adapter_merged_over_it_restores_the_base(load, input_ids, tmp_path):
    first = _save(load, tmp_path / "first", **FIRST)
    new = _save(load, tmp_path / "new", **FITTING["other seed"])
    model = PeftModel.from_pretrained(load(), first)
    model.load_adapter(_save(load, tmp_path / "other", seed=1, heads_per_layer=2), adapter_name="other")
    base = _base_weights(model)
    model.base_model.set_adapter(["default", "other"])
    model.merge_adapter(["default", "other"])
    hotswap_adapter(model, new)
    merged = _logits(model, input_ids)
    model.unmerge_adapter()
    _assert_same_base(model, base)
    torch.testing.assert_close(_logits(model, input_ids), merged, atol=1e-5, rtol=1e-5)  # both active, unmerged


# --------------------------------------------------------------------------------------------------
# prepare_model_for_compiled_hotswap
def test_prepare_makes_room_for_bigger_selections_and_other_layers_without_changing_outputs(load, input_ids, tmp_path):
    first = _save(load, tmp_path / "first", seed=0, heads_per_layer=1, channels_per_layer=3, layers_to_transform=[0])
    bigger = _save(load, tmp_path / "bigger", seed=1, heads_per_layer=3, channels_per_layer=8, layers_to_transform=[1])
    rows = _save(load, tmp_path / "rows", seed=2, heads_per_layer=2, channels_per_layer=5, train_v=True, train_up=True)
    model = PeftModel.from_pretrained(load(), first)
    before = _logits(model, input_ids)
    with pytest.raises(ValueError, match="does not.*prepare_model_for_compiled_hotswap"):
        hotswap_adapter(model, bigger)

    prepare_model_for_compiled_hotswap(model, adapters=[str(bigger), str(rows)])

    assert torch.equal(_logits(model, input_ids), before)
    widths = {n: m.s2ft_delta["default"].shape for n, m in model.named_modules() if isinstance(m, S2FTLayer)}
    assert len(widths) == 8  # o, down, v, up in both layers
    tensors = _adapter_tensors(model)
    for path in (bigger, rows, first):
        hotswap_adapter(model, path)
        torch.testing.assert_close(_logits(model, input_ids), _reference(load, path, input_ids), atol=1e-6, rtol=0)
    assert _adapter_tensors(model) == tensors


def test_prepare_to_a_target_size_pads_whole_units_and_keeps_outputs(load, input_ids, tmp_path):
    first = _save(load, tmp_path / "first", seed=0, heads_per_layer=1, channels_per_layer=3)
    model = PeftModel.from_pretrained(load(), first)
    before = _logits(model, input_ids)
    prepare_model_for_compiled_hotswap(model, target_size=10)
    assert torch.equal(_logits(model, input_ids), before)
    widths = {
        n.rsplit(".", 1)[-1]: tuple(m.s2ft_delta["default"].shape)
        for n, m in model.named_modules()
        if isinstance(m, S2FTLayer)
    }
    assert widths == {"o_proj": (32, 16), "down_proj": (32, 10)}  # 10 columns of o_proj round up to 2 heads of 8
    prepare_model_for_compiled_hotswap(model, target_size=1000)  # capped at the layers' widths
    assert {tuple(m.s2ft_delta["default"].shape) for m in model.modules() if isinstance(m, S2FTLayer)} == {
        (32, 32),
        (32, 48),
    }
    torch.testing.assert_close(_logits(model, input_ids), before, atol=1e-6, rtol=0)
    model.save_pretrained(tmp_path / "saved")  # the padded adapter is a valid adapter of whole units
    torch.testing.assert_close(_reference(load, tmp_path / "saved", input_ids), before, atol=1e-6, rtol=0)


def test_a_prepared_layer_keeps_its_parameter_and_drops_a_gradient_of_the_old_shape(load, input_ids, tmp_path):
    model = get_peft_model(load(), S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=1, channels_per_layer=2))
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    prepare_model_for_compiled_hotswap(model, target_size=16)  # every layer grows
    assert {n: p for n, p in model.named_parameters() if p.requires_grad} == params
    assert all(p.grad is None for p in params.values())
    model(input_ids=input_ids, labels=input_ids).loss.backward()  # trains on at the new shape
    assert all(p.grad.shape == p.shape for p in params.values())


# --------------------------------------------------------------------------------------------------
# compiled
def test_a_compiled_model_runs_the_swapped_adapter_without_recompiling(load, input_ids, tmp_path):
    first = _save(load, tmp_path / "first", seed=0, heads_per_layer=1, channels_per_layer=3, layers_to_transform=[0])
    others = [
        _save(load, tmp_path / "bigger", seed=1, heads_per_layer=3, channels_per_layer=8, layers_to_transform=[1]),
        _save(load, tmp_path / "rows", seed=2, heads_per_layer=2, channels_per_layer=5, train_v=True, train_up=True),
    ]
    # Trainable deltas: torch.compile(fullgraph=True) of an S2FT model whose deltas need no gradient fails (see
    # test_a_frozen_s2ft_model_compiles_to_one_graph below), which is not the swap's doing.
    model = PeftModel.from_pretrained(load(), first, is_trainable=True)
    prepare_model_for_compiled_hotswap(model, adapters=others)
    compilations = []

    def counting_backend(graph, example_inputs):
        compilations.append(graph)
        return graph.forward

    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
        torch.testing.assert_close(_logits(compiled, input_ids), _reference(load, first, input_ids), atol=1e-6, rtol=0)
        assert len(compilations) == 1
        with torch._dynamo.config.patch(error_on_recompile=True):
            for path in [*others, first]:
                hotswap_adapter(compiled, path)
                expected = _reference(load, path, input_ids)
                torch.testing.assert_close(_logits(compiled, input_ids), expected, atol=1e-6, rtol=0)
        assert len(compilations) == 1
        # The counter sees a real change: a shape that changes under the compiled model recompiles it.
        layer = next(m for m in model.modules() if isinstance(m, S2FTLayer))
        layer.resize_adapter("default", layer.selected("default")[:1])
        _logits(compiled, input_ids)
        assert len(compilations) == 2
    finally:
        torch._dynamo.reset()


def test_a_frozen_s2ft_model_compiles_to_one_graph(load, input_ids, tmp_path):
    model = PeftModel.from_pretrained(load(), _save(load, tmp_path / "first", **FIRST))  # inference mode: frozen
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(_logits(compiled, input_ids), _logits(model, input_ids))
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------
# fused experts, modules_to_save, the hub
@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> str:
    return families.build("mixtral", tmp_path_factory.mktemp("mixtral"))


@pytest.mark.parametrize("merged", [False, True])
def test_experts_layers_are_swapped_expert_by_expert(mixtral_dir, tmp_path, merged):
    def load(name="mixtral", **kwargs):
        return families.load(mixtral_dir, "mixtral", **kwargs)

    input_ids = families.sample_input_ids("mixtral")
    first = _save(load, tmp_path / "first", "mixtral", seed=0, heads_per_layer=1, channels_per_layer=4)
    fewer = _save(load, tmp_path / "fewer", "mixtral", seed=1, heads_per_layer=1, channels_per_layer=2)
    bigger = _save(load, tmp_path / "bigger", "mixtral", seed=2, heads_per_layer=1, channels_per_layer=7)
    model = PeftModel.from_pretrained(load(), first)
    assert any(isinstance(m, S2FTExpertsLayer) for m in model.modules())
    base = _base_weights(model)
    with pytest.raises(ValueError, match="per expert.*prepare_model_for_compiled_hotswap"):
        hotswap_adapter(model, bigger)
    prepare_model_for_compiled_hotswap(model, adapters=[bigger])
    if merged:
        model.merge_adapter()
    tensors = _adapter_tensors(model)
    for path in (fewer, bigger, first):
        hotswap_adapter(model, path)
        expected = _reference(load, path, input_ids, merged=merged, model_name="mixtral")
        torch.testing.assert_close(_logits(model, input_ids), expected, atol=1e-6, rtol=0)
    assert _adapter_tensors(model) == tensors
    if merged:
        model.unmerge_adapter()
        _assert_same_base(model, base)


def test_modules_to_save_are_swapped_with_the_layers(tmp_path):
    name = "bert-seq-cls"
    directory = families.build(name, tmp_path / "base")
    input_ids = families.sample_input_ids(name)

    def adapter(path, **config):
        model = get_peft_model(
            families.load(directory, name), S2FTConfig(task_type="SEQ_CLS", init_weights=False, **config)
        )
        with torch.no_grad():
            for param in model.base_model.model.classifier.modules_to_save["default"].parameters():
                param.normal_()
        model.save_pretrained(path)
        return path

    first, new = adapter(tmp_path / "first", seed=0), adapter(tmp_path / "new", seed=1)
    model = PeftModel.from_pretrained(families.load(directory, name), first)
    classifier = model.base_model.model.classifier.modules_to_save["default"].weight
    identity = (id(classifier), classifier.data_ptr())
    expected = _logits(PeftModel.from_pretrained(families.load(directory, name), new), input_ids)
    assert not torch.allclose(_logits(model, input_ids), expected)
    hotswap_adapter(model, new)
    torch.testing.assert_close(_logits(model, input_ids), expected, atol=1e-6, rtol=0)
    assert (id(classifier), classifier.data_ptr()) == identity


def test_an_adapter_is_swapped_in_by_hub_id(load, input_ids, tmp_path, monkeypatch):
    repo_id, revision = "someone/s2ft-new", "0123456789abcdef0123456789abcdef01234567"
    new = _save(load, tmp_path / "new", **FITTING["other seed"])
    cache = tmp_path / "hub_cache"  # laid out as huggingface_hub leaves a download
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(new, repo_dir / "snapshots" / revision)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = PeftModel.from_pretrained(load(), _save(load, tmp_path / "first", **FIRST))
    hotswap_adapter(model, repo_id, cache_dir=str(cache))
    torch.testing.assert_close(_logits(model, input_ids), _reference(load, new, input_ids), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# refusals
def _truncated(path):
    data = (path / ADAPTER_FILE).read_bytes()
    (path / ADAPTER_FILE).write_bytes(data[: len(data) // 2])
    return path


def _without_s2ft_tensors(path):
    save_file({"unrelated.weight": torch.zeros(2)}, path / ADAPTER_FILE)
    return path


def _without_weights(path):
    (path / ADAPTER_FILE).unlink()
    return path


def _lora(load, path):
    get_peft_model(load(), LoraConfig(target_modules=["o_proj"])).save_pretrained(path)
    return path


# what the refused file is: (how it is made, the error's type, what the error says)
REFUSED_FILES = {
    "bigger selection": (
        lambda load, p: _save(load, p, heads_per_layer=3, channels_per_layer=6),
        ValueError,
        "trains 24 positions, adapter 'default' holds 16.*prepare_model_for_compiled_hotswap",
    ),
    "a layer it does not train": (
        lambda load, p: _save(load, p, seed=1, heads_per_layer=1, channels_per_layer=2, train_v=True),
        ValueError,
        "layer.*that adapter 'default' does not.*prepare_model_for_compiled_hotswap",
    ),
    "truncated file": (
        lambda load, p: _truncated(_save(load, p, **FIRST)),
        AdapterMismatchError,
        "not a complete safetensors",
    ),
    "not S2FT tensors": (
        lambda load, p: _without_s2ft_tensors(_save(load, p, **FIRST)),
        AdapterMismatchError,
        "holds no S2FT layer",
    ),
    "no weights file": (lambda load, p: _without_weights(_save(load, p, **FIRST)), AdapterMismatchError, "no weights"),
    "another geometry": (lambda load, p: _save(load, p, "llama-mha", seed=1), AdapterMismatchError, "another arch"),
    "a LoRA adapter": (_lora, AdapterMismatchError, "LoraConfig adapter, not an S2FT adapter"),
}


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("refused", list(REFUSED_FILES))
def test_a_refused_swap_leaves_the_model_as_it_was(load, input_ids, tmp_path, refused, merged):
    make, error, message = REFUSED_FILES[refused]
    model = PeftModel.from_pretrained(load(), _save(load, tmp_path / "first", heads_per_layer=2, channels_per_layer=6))
    if merged:
        model.merge_adapter()
    path = make(load, tmp_path / "refused")
    before, config = model_snapshot(model), model.peft_config["default"].to_dict()
    logits = _logits(model, input_ids)
    with pytest.raises(error, match=message):
        hotswap_adapter(model, str(path))
    assert_same_snapshot(before, model_snapshot(model))
    assert model.peft_config["default"].to_dict() == config
    assert torch.equal(_logits(model, input_ids), logits)


def test_permute_mode_unknown_adapters_and_unknown_arguments_are_refused(load, tmp_path):
    new = _save(load, tmp_path / "new", **FITTING["other seed"])
    permuted = get_peft_model(load(), S2FTConfig(task_type="CAUSAL_LM", init_weights=False, permute=True, **FIRST))
    model = PeftModel.from_pretrained(load(), _save(load, tmp_path / "first", **FIRST))
    for target, call, message in (
        (permuted, lambda: hotswap_adapter(permuted, new), "permute mode"),
        (permuted, lambda: prepare_model_for_compiled_hotswap(permuted, target_size=16), "permute mode"),
        (model, lambda: hotswap_adapter(model, new, adapter_name="missing"), "no adapter named 'missing'"),
        (model, lambda: prepare_model_for_compiled_hotswap(model, [new], adapter_name="x"), "no adapter named 'x'"),
        (model, lambda: hotswap_adapter(model, new, seed=3), "Unexpected keyword argument"),
    ):
        before = model_snapshot(target)
        with pytest.raises((ValueError, TypeError), match=message):
            call()
        assert_same_snapshot(before, model_snapshot(target))


def test_prepare_refuses_a_compiled_model_its_original_and_one_compiled_in_place(load, tmp_path):
    good = _save(load, tmp_path / "good", seed=2, heads_per_layer=4)
    original = PeftModel.from_pretrained(load(), _save(load, tmp_path / "first", **FIRST))
    compiled = torch.compile(original, backend="eager")
    in_place = PeftModel.from_pretrained(load(), tmp_path / "first")
    in_place.compile(backend="eager")
    for model in (compiled, original, in_place):
        before = model_snapshot(model)
        with pytest.raises(ValueError, match="already compiled.*then torch.compile"):
            prepare_model_for_compiled_hotswap(model, [good])
        assert_same_snapshot(before, model_snapshot(model))


def test_prepare_refuses_merged_adapters_empty_calls_and_bad_files(load, tmp_path):
    model = PeftModel.from_pretrained(load(), _save(load, tmp_path / "first", **FIRST))
    bad = _truncated(_save(load, tmp_path / "bad", seed=1, heads_per_layer=4))
    good = _save(load, tmp_path / "good", seed=2, heads_per_layer=4)
    before = model_snapshot(model)
    for call, message in (
        (lambda: prepare_model_for_compiled_hotswap(model), "Nothing to prepare"),
        (lambda: prepare_model_for_compiled_hotswap(model, target_size=0), "positive number"),
        (lambda: prepare_model_for_compiled_hotswap(model, [good, bad]), "not a complete safetensors"),
    ):
        with pytest.raises(ValueError, match=message):
            call()
        assert_same_snapshot(before, model_snapshot(model))
    model.merge_adapter()
    merged = model_snapshot(model)
    with pytest.raises(ValueError, match="merged into the base weights"):
        prepare_model_for_compiled_hotswap(model, [good])
    assert_same_snapshot(merged, model_snapshot(model))


def test_a_swap_into_an_adapter_injected_by_transformers(load, input_ids, tmp_path):
    first = _save(load, tmp_path / "first", **FIRST)
    new = _save(load, tmp_path / "new", **FITTING["fewer units"])
    model = load()
    model.load_adapter(str(first), adapter_name="served")
    tensors = _adapter_tensors(model)
    hotswap_adapter(model, new, adapter_name="served", torch_device="cpu")
    torch.testing.assert_close(_logits(model, input_ids), _reference(load, new, input_ids), atol=1e-6, rtol=0)
    assert _adapter_tensors(model) == tensors


def test_prepare_adds_the_adapter_to_a_layer_of_another_adapter_leaving_that_one_as_it_was(load, input_ids, tmp_path):
    model = PeftModel.from_pretrained(load(), _save(load, tmp_path / "first", seed=0, layers_to_transform=[0]))
    model.load_adapter(_save(load, tmp_path / "other", seed=1, layers_to_transform=[1]), adapter_name="other")
    other = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters() if n.endswith(".other")}
    layer_1 = _save(load, tmp_path / "layer-1", seed=2, heads_per_layer=2, layers_to_transform=[1])
    before = _logits(model, input_ids)
    prepare_model_for_compiled_hotswap(model, adapters=[layer_1])
    assert torch.equal(_logits(model, input_ids), before)
    shared = [m for m in model.modules() if isinstance(m, S2FTLayer) and {"default", "other"} <= set(m.s2ft_delta)]
    assert len(shared) == 2 and all(m.active_adapters == ["default"] for m in shared)
    for name, param in model.named_parameters():
        if name.endswith(".other"):
            assert (param.requires_grad, True) == (other[name][0], torch.equal(param, other[name][1])), name
    hotswap_adapter(model, layer_1)
    torch.testing.assert_close(_logits(model, input_ids), _reference(load, layer_1, input_ids), atol=1e-6, rtol=0)
