"""Every described family, on a tiny random model: the description is right, and S2FT works on it end to end."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, build, load, main_output, sample_input_ids
from peft import PeftModel, get_peft_model
from torch import nn

from peft_s2ft import S2FTConfig, S2FTLayer
from peft_s2ft.architectures import describe
from peft_s2ft.architectures.description import CHANNEL, HEAD, KV_GROUP
from peft_s2ft.architectures.discovery import base_layer_of
from peft_s2ft.experts import S2FTExpertsLayer
from peft_s2ft.permutation import member_orders

DENSE_AND_ENCODERS = [name for name, family in FAMILIES.items() if family.kind != "moe"]
MOE = [name for name, family in FAMILIES.items() if family.kind == "moe"]
ALL = DENSE_AND_ENCODERS + MOE
ORDER_SENSITIVE = {"falcon-alibi"}  # ALiBi: head order matters, permute mode refused


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, str]:
    return {name: build(name, tmp_path_factory.mktemp(name)) for name in FAMILIES}


def _derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation that moves every element (when n > 1), so no part can stay in place by chance."""
    while True:
        order = torch.randperm(n, generator=generator)
        if n == 1 or not (order == torch.arange(n)).any():
            return order


def _random_unit_orders(block, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random permutation of the block's units that keeps every query head with its K/V group."""
    if block.kind == "ffn":
        return {CHANNEL: _derangement(block.num_units, generator)}
    groups = _derangement(block.num_groups, generator)
    within = [_derangement(block.group_size, generator) for _ in range(block.num_groups)]
    heads = torch.cat([g * block.group_size + within[i] for i, g in enumerate(groups.tolist())])
    return {HEAD: heads, KV_GROUP: groups}


def _co_permute(model: nn.Module, skip: int | None = None) -> None:
    """Permute every unit of every block through the description (optionally forgetting parameter `skip`)."""
    generator = torch.Generator().manual_seed(3)
    count = 0
    with torch.no_grad():
        for block in describe(model).blocks:
            for member in member_orders(model, block, _random_unit_orders(block, generator)):
                if count != skip:
                    owner = base_layer_of(model.get_submodule(member.module_path))
                    tensor = getattr(owner, member.name)
                    tensor.copy_(tensor.index_select(member.dim, member.order))
                count += 1


def _task_config(name: str, **kwargs) -> S2FTConfig:
    return S2FTConfig(task_type=FAMILIES[name].task_type, **kwargs)


def _output(model, name: str) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(input_ids=sample_input_ids(name)))


@pytest.mark.parametrize("name", DENSE_AND_ENCODERS + MOE)
def test_co_permuting_every_described_tensor_preserves_the_function(family_dirs, name):
    model = load(family_dirs[name], name)
    expected = _output(model, name)
    _co_permute(model)
    if name in ORDER_SENSITIVE:  # why permute mode is refused there
        assert (_output(model, name) - expected).abs().max() > 1e-3
        return
    torch.testing.assert_close(_output(model, name), expected, atol=1e-5, rtol=1e-4)


def _members(model) -> list[tuple[str, str]]:
    generator = torch.Generator()
    return [
        (m.module_path, m.name)
        for block in describe(model).blocks
        for m in member_orders(model, block, _random_unit_orders(block, generator))
    ]


# K biases without rotary embeddings shift all of a query's scores equally: leaving them unpermuted is exact maths.
SYMMETRIC = {("opt", "self_attn.k_proj"), ("bert-seq-cls", "attention.self.key")}


@pytest.mark.parametrize(
    "name", ["llama", "qwen2", "phi3", "gpt2", "gpt_neox", "falcon-new", "olmo2", "cohere", "opt", "bert-seq-cls"]
)
def test_the_co_permutation_test_notices_a_forgotten_tensor(family_dirs, name):
    """Leaving out any one described parameter changes the output: the test above can fail."""
    members = _members(load(family_dirs[name], name))
    expected = _output(load(family_dirs[name], name), name)
    for skip, (path, param) in enumerate(members):
        if param == "bias" and any((name, suffix) in SYMMETRIC and path.endswith(suffix) for _, suffix in SYMMETRIC):
            continue
        model = load(family_dirs[name], name)
        _co_permute(model, skip=skip)
        assert (_output(model, name) - expected).abs().max() > 1e-4, f"{path}.{param} is not checked"


@pytest.mark.parametrize("name", ALL)
def test_identity_at_init_and_a_random_delta_acts(family_dirs, name):
    base = load(family_dirs[name], name)
    expected = _output(base, name)
    model = get_peft_model(base, _task_config(name))
    torch.testing.assert_close(_output(model, name), expected, atol=1e-6, rtol=1e-5)
    changed = get_peft_model(load(family_dirs[name], name), _task_config(name, init_weights=False))
    assert (_output(changed, name) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("name", ALL)
def test_only_the_selected_units_train(family_dirs, name):
    model = get_peft_model(load(family_dirs[name], name), _task_config(name, init_weights=False))
    structure = describe(model.base_model.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in trainable if "s2ft_" not in n}
    assert all("modules_to_save" in n for n in head), head  # classifiers of encoder tasks, as PEFT adds them
    out = main_output(model(input_ids=sample_input_ids(name)))
    out.float().pow(2).mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    layers = {path: m for path, m in model.base_model.model.named_modules() if isinstance(m, S2FTLayer)}
    experts = {path: m for path, m in model.base_model.model.named_modules() if isinstance(m, S2FTExpertsLayer)}
    roles = structure.trainable_paths()
    assert {roles[p][1] for p in layers | experts} == (
        {"output", "down"} | ({"experts"} if FAMILIES[name].kind == "moe" else set())
        if structure.ffn
        else {"output", "experts"}
    )  # every kind trained by default
    assert len(experts) == len(structure.experts)
    for path, layer in layers.items():
        block, role = roles[path]
        span = block.trained[role]
        indices = layer.selected("default")
        count = block.num_units if span.unit != KV_GROUP else block.num_groups
        positions = span.positions(torch.arange(count)).reshape(count, span.width)
        whole = torch.isin(positions, indices).all(dim=1)
        assert sorted(positions[whole].flatten().tolist()) == sorted(indices.tolist())  # whole units only


@pytest.mark.parametrize("name", ALL)
def test_save_load_merge_and_unload(family_dirs, name, tmp_path):
    model = get_peft_model(load(family_dirs[name], name), _task_config(name, init_weights=False))
    expected = _output(model, name)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load(family_dirs[name], name), tmp_path)
    torch.testing.assert_close(_output(reloaded, name), expected)
    merged = reloaded.merge_and_unload()
    assert not any(isinstance(m, S2FTLayer) for m in merged.modules())
    torch.testing.assert_close(_output(merged, name), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_two_active_adapters_equal_both_merged(family_dirs, name):
    model = get_peft_model(load(family_dirs[name], name), _task_config(name, init_weights=False, seed=1))
    model.add_adapter("second", _task_config(name, init_weights=False, seed=2))
    if FAMILIES[name].task_type in ("SEQ_CLS", "TOKEN_CLS"):
        # PEFT activates one classifier (modules_to_save) at a time, for every method: switch between adapters.
        first = _output(model, name)
        model.set_adapter("second")
        assert (_output(model, name) - first).abs().max() > 1e-3
        model.set_adapter("default")
        torch.testing.assert_close(_output(model, name), first)
        return
    model.base_model.set_adapter(["default", "second"])
    both = _output(model, name)
    assert (both - _output(load(family_dirs[name], name), name)).abs().max() > 1e-3
    model.merge_adapter(["default", "second"])
    torch.testing.assert_close(_output(model, name), both, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_permute_mode_preserves_the_function_or_is_refused(family_dirs, name):
    base = load(family_dirs[name], name)
    expected = _output(base, name)
    config = _task_config(name, permute=True)
    if FAMILIES[name].kind == "moe":
        with pytest.raises(ValueError, match="mixture-of-experts"):
            get_peft_model(base, config)
        return
    if name in ORDER_SENSITIVE:
        with pytest.raises(ValueError, match="alibi=True"):
            get_peft_model(base, config)
        return
    model = get_peft_model(base, config)
    assert all(m.block_range is not None for m in model.modules() if isinstance(m, S2FTLayer))
    torch.testing.assert_close(_output(model, name), expected, atol=1e-5, rtol=1e-4)
    unloaded = model.unload()
    for key, value in load(family_dirs[name], name).state_dict().items():
        assert torch.equal(unloaded.state_dict()[key], value), key


@pytest.mark.parametrize("name", ALL)
def test_an_adapted_layer_saves_only_its_selected_input_columns(family_dirs, name):
    model = get_peft_model(load(family_dirs[name], name), _task_config(name))
    layer = next(m for m in model.modules() if isinstance(m, S2FTLayer) and m.axis == "in")
    width = len(layer.selected("default"))
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    parameters = {p.data_ptr() for p in layer.parameters()}
    saved = []

    def keep(tensor):
        if tensor.data_ptr() not in parameters and tensor.dtype.is_floating_point:
            saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        layer(x)
    assert saved == [(10, width)]


# Fused layouts that interleave V rows with Q/K rows per head or group: their V rows cannot form one block.
INTERLEAVED_VALUES = {"gpt_neox", "falcon-mha", "falcon-new", "falcon-alibi"}


@pytest.mark.parametrize("name", DENSE_AND_ENCODERS)
def test_permute_mode_with_value_and_up_rows_saves_what_the_default_mode_loads(family_dirs, name, tmp_path):
    base = load(family_dirs[name], name)
    # Three heads: two K/V groups where there are groups, so interleaved V rows of two units must be contiguous.
    config = _task_config(name, permute=True, train_v=True, train_up=True, init_weights=False, heads_per_layer=3)
    if name in ORDER_SENSITIVE or name in INTERLEAVED_VALUES:
        with pytest.raises(ValueError, match="alibi=True|fused layout interleaves them"):
            get_peft_model(base, config)
        return
    model = get_peft_model(base, config)
    expected = _output(model, name)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(config_path.read_text().replace('"permute": true', '"permute": false'))
    reloaded = PeftModel.from_pretrained(load(family_dirs[name], name), tmp_path)
    assert all(m.block_range is None for m in reloaded.modules() if isinstance(m, S2FTLayer))
    torch.testing.assert_close(_output(reloaded, name), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", [n for n in ALL if FAMILIES[n].task_type in ("CAUSAL_LM", "FEATURE_EXTRACTION")])
def test_exports_losslessly_to_lora(family_dirs, name):
    from peft import convert_to_lora, set_peft_model_state_dict

    model = get_peft_model(load(family_dirs[name], name), _task_config(name, init_weights=False))
    if FAMILIES[name].kind == "moe":  # a per-expert delta has no LoRA layer to go to
        with pytest.raises(TypeError, match="do not support LoRA conversion"):
            convert_to_lora(model, rank=16)
        return
    expected = _output(model, name)
    lora_config, lora_state = convert_to_lora(model, rank=16)  # 16 >= the widest selection of these models
    lora_model = get_peft_model(load(family_dirs[name], name), lora_config)
    set_peft_model_state_dict(lora_model, lora_state)
    torch.testing.assert_close(_output(lora_model, name), expected, atol=1e-4, rtol=1e-4)


CROSS_LOADS = [
    ("llama", "qwen3", {}),  # head width 8 vs 16: the same columns would be half heads
    ("llama", "mistral", {}),  # FFN width 48 vs 56: the same channel numbers would be other channels
    ("falcon-mqa", "falcon-new", {"train_v": True}),  # one K/V group vs two: "value" rows would be a query head
    ("mixtral", "olmoe", {}),
]


@pytest.mark.parametrize("loader", ["PeftModel.from_pretrained", "transformers load_adapter"])
@pytest.mark.parametrize(("source", "target", "extra"), CROSS_LOADS)
def test_an_adapter_made_for_another_architecture_is_refused(family_dirs, tmp_path, source, target, extra, loader):
    from snapshots import assert_same_snapshot, model_snapshot

    get_peft_model(load(family_dirs[source], source), _task_config(source, **extra)).save_pretrained(tmp_path)
    model = load(family_dirs[target], target)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="another architecture"):
        if loader == "PeftModel.from_pretrained":
            PeftModel.from_pretrained(model, tmp_path)
        else:
            model.load_adapter(str(tmp_path), adapter_name="other")
    assert_same_snapshot(before, model_snapshot(model))


def test_a_file_without_geometry_that_splits_this_models_heads_is_refused(family_dirs, tmp_path):
    """Adapters saved before the geometry was recorded are still checked unit by unit."""
    import json

    get_peft_model(load(family_dirs["llama"], "llama"), _task_config("llama")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["base_geometry"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not form whole heads"):
        PeftModel.from_pretrained(load(family_dirs["qwen3"], "qwen3"), tmp_path)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_up_rows_are_refused_where_the_experts_would_not_get_them(family_dirs, name):
    """All-MoE models have no up projection to train; mixed ones would train up rows of the dense FFNs only."""
    with pytest.raises(ValueError, match="train_up=True"):
        get_peft_model(load(family_dirs[name], name), _task_config(name, train_up=True))


def test_a_torch_level_load_takes_an_experts_layers_channels_in_another_order(family_dirs):
    model = get_peft_model(load(family_dirs["mixtral"], "mixtral"), _task_config("mixtral", init_weights=False))
    expected = _output(model, "mixtral")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for key in [k for k in state if k.endswith("s2ft_indices.default") and ".experts." in k]:
        delta_key = key.replace("s2ft_indices", "s2ft_delta")
        state[key], state[delta_key] = state[key].flip(1), state[delta_key].flip(2)
    fresh = get_peft_model(load(family_dirs["mixtral"], "mixtral"), _task_config("mixtral"))
    fresh.load_state_dict(state)
    torch.testing.assert_close(_output(fresh, "mixtral"), expected)


def test_a_multimodal_wrapper_adapts_only_its_text_decoder():
    """Llama 4's vision tower uses Llama names but its own geometry: only the language model is described."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(0)
    text = dict(vocab_size=96, hidden_size=32, intermediate_size=48, intermediate_size_mlp=63, num_hidden_layers=2)
    text |= dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, max_position_embeddings=64
    )
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28)
    vision |= dict(patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    config = Llama4Config(text_config=text | {"interleave_moe_layer_step": 2}, vision_config=vision)
    model = get_peft_model(Llama4ForConditionalGeneration(config).eval(), S2FTConfig(task_type="CAUSAL_LM"))
    adapted = [n for n, m in model.named_modules() if isinstance(m, (S2FTLayer, S2FTExpertsLayer))]
    assert adapted and all(".language_model." in n for n in adapted)


@pytest.mark.parametrize("head_dim", [4, 16])
def test_a_config_that_disagrees_with_the_weights_is_refused(tmp_path, head_dim):
    """The parts of a tensor's axis must tile it exactly: too few positions (head_dim 4 of 8) or positions past its
    end (16) mean the description would permute or train the wrong columns."""
    from peft_s2ft.architectures.discovery import UnsupportedModelError

    model = load(build("llama", tmp_path), "llama")
    model.config.head_dim = head_dim
    with pytest.raises(UnsupportedModelError, match="does not fit"):
        describe(model)
