"""Regression tests from an adversarial review of the serving features (mixed batches, fusion, disjoint selections,
hot-swap, export): each reproduces one bug that was found and fixed."""

from __future__ import annotations

import contextlib
import shutil
import threading

import families
import pytest
import torch
from families import build, main_output, sample_input_ids
from peft import PeftModel, convert_to_lora, get_peft_model

from peft_s2ft import S2FTConfig, prepare_model_for_compiled_hotswap, selection_overlap


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    return {name: build(name, tmp_path_factory.mktemp(name)) for name in ("llama", "opt", "mixtral")}


def _base(dirs, name: str = "llama"):
    return families.load(dirs[name], name)


def _logits(model, name: str = "llama") -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(sample_input_ids(name, batch=2, length=7)))


# --------------------------------------------------------------------------------------------------
# disjoint_from
@pytest.mark.parametrize("seed", range(4))
def test_disjoint_from_with_train_v_keeps_off_the_kv_groups_of_the_other_adapters_heads(dirs, seed):
    """B trains the value rows of the K/V groups of its heads; a group that one of A's heads reads is A's too
    (selection_overlap counts it so), so a B `disjoint_from` A must not pick a head in it."""
    model = get_peft_model(
        _base(dirs), S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=1, channels_per_layer=4), adapter_name="a"
    )
    try:
        model.add_adapter(
            "b",
            S2FTConfig(
                task_type="CAUSAL_LM",
                heads_per_layer=1,
                channels_per_layer=4,
                seed=seed,
                train_v=True,
                disjoint_from=["a"],
            ),
        )
    except ValueError:
        return  # refusing (no free K/V group) is fine
    assert selection_overlap(model, "a", "b")["shared"] == 0


@pytest.mark.parametrize("seed", range(6))
def test_permute_mode_disjoint_from_never_selects_a_taken_head(dirs, tmp_path, seed):
    """Permute mode fills whole K/V groups first (selection._pick); that must not pull in the other adapter's heads."""
    saved = str(tmp_path / "a")
    get_peft_model(
        _base(dirs), S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=1, channels_per_layer=4)
    ).save_pretrained(saved)
    config = S2FTConfig(
        task_type="CAUSAL_LM", heads_per_layer=2, channels_per_layer=4, seed=seed, permute=True, disjoint_from=[saved]
    )
    try:
        model = get_peft_model(_base(dirs), config)
    except ValueError:
        return  # refusing (the free heads cannot be made contiguous) is fine
    assert selection_overlap(model, "default", saved)["shared"] == 0


def test_transformers_load_adapter_follows_the_file_without_the_disjoint_from_adapter(dirs, tmp_path):
    """The file decides the selection on every load path; transformers' load_adapter must not resolve disjoint_from
    (here a folder that no longer exists), as PeftModel.from_pretrained does not."""
    first = tmp_path / "first"
    get_peft_model(_base(dirs), S2FTConfig(task_type="CAUSAL_LM", init_weights=False)).save_pretrained(first)
    torch.manual_seed(0)
    config = S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=1, disjoint_from=[str(first)])
    get_peft_model(_base(dirs), config).save_pretrained(tmp_path / "second")
    shutil.rmtree(first)
    expected = _logits(PeftModel.from_pretrained(_base(dirs), str(tmp_path / "second")).eval())

    model = _base(dirs)
    model.load_adapter(str(tmp_path / "second"), adapter_name="second")
    torch.testing.assert_close(_logits(model.eval()), expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# add_weighted_adapter
def test_a_fusion_with_a_train_v_adapter_saves_a_config_that_transformers_loads(dirs, tmp_path):
    """Fusing an adapter without value rows with one that has them: the fused config gets `v_proj` in its targets,
    so it must also say train_v=True, or transformers' load_adapter refuses the saved folder."""
    model = get_peft_model(_base(dirs), S2FTConfig(task_type="CAUSAL_LM", init_weights=False), adapter_name="a")
    model.add_adapter("b", S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=1, train_v=True))
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab")
    model.set_adapter("ab")
    expected = _logits(model.eval())
    model.save_pretrained(tmp_path, selected_adapters=["ab"])

    loaded = _base(dirs)
    loaded.load_adapter(str(tmp_path / "ab"), adapter_name="ab")
    torch.testing.assert_close(_logits(loaded.eval()), expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# mixed-adapter batches
@pytest.mark.parametrize("name", ["opt", "mixtral"])
def test_adapter_names_of_the_wrong_length_are_refused_on_layers_that_see_flattened_tokens(dirs, name):
    """OPT's fc2 and fused experts see (batch * positions, features); 2 names for 4 rows must raise there as they do
    on a (batch, positions, features) layer, not hand rows 0-1 to the first name and rows 2-3 to the second."""
    model = get_peft_model(_base(dirs, name), S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=0), adapter_name="a")
    model.add_adapter("b", S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=0, seed=1))
    model.eval()
    with pytest.raises(ValueError, match="adapter_names"), torch.no_grad():
        model(sample_input_ids(name, batch=4, length=5), adapter_names=["a", "b"])


def test_threads_serving_mixed_batches_get_their_own_rows_adapters(dirs):
    """Two threads each serve a mixed batch on one model; each must get what it gets alone (README: several threads
    can serve one model). Both calls are held inside the forward together, after their hooks are registered."""
    torch.manual_seed(0)
    model = get_peft_model(_base(dirs), S2FTConfig(task_type="CAUSAL_LM", init_weights=False), adapter_name="a")
    model.add_adapter("b", S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=1))
    model.eval()
    inputs = [sample_input_ids("llama", batch=2, length=8, seed=i) for i in range(2)]
    names = [["a", "b"], ["b", "__base__"]]
    with torch.no_grad():
        expected = [model(x, adapter_names=n).logits for x, n in zip(inputs, names, strict=True)]

    barrier = threading.Barrier(2)

    def wait_for_the_other_call(module, args):
        # A fix that serializes calls never has both inside at once: the wait then times out.
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=5)

    handle = model.base_model.model.model.layers[0].register_forward_pre_hook(wait_for_the_other_call)
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def serve(worker: int) -> None:
        try:
            with torch.no_grad():
                results[worker] = model(inputs[worker], adapter_names=names[worker]).logits
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(w,)) for w in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    handle.remove()
    assert not errors
    for worker in range(2):
        assert torch.equal(results[worker], expected[worker]), f"thread {worker} got another call's adapters"


# --------------------------------------------------------------------------------------------------
# hot-swap preparation and convert_to_lora
def test_convert_to_lora_of_another_adapter_after_prepare_added_layers(dirs, tmp_path):
    """prepare_model_for_compiled_hotswap wraps new layers for 'default'; convert_to_lora of the model's other adapter
    must still know that those layers simply do not hold it (zero delta), as it does on injected layers."""
    torch.manual_seed(0)
    get_peft_model(
        _base(dirs), S2FTConfig(task_type="CAUSAL_LM", init_weights=False, layers_to_transform=[1])
    ).save_pretrained(tmp_path / "layer1")
    model = get_peft_model(_base(dirs), S2FTConfig(task_type="CAUSAL_LM", init_weights=False, layers_to_transform=[0]))
    model.add_adapter("a", S2FTConfig(task_type="CAUSAL_LM", init_weights=False, layers_to_transform=[0], seed=3))
    model.eval()
    prepare_model_for_compiled_hotswap(model, adapters=[str(tmp_path / "layer1")])
    config, state_dict = convert_to_lora(model, rank=16, adapter_name="a")
    assert state_dict


def test_a_density_of_zero_is_refused_before_dare_divides_by_it(dirs):
    model = get_peft_model(_base(dirs), S2FTConfig(task_type="CAUSAL_LM", init_weights=False), adapter_name="a")
    model.add_adapter("b", S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=1))
    with pytest.raises(ValueError, match=r"needs a `density` in \(0, 1\]"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "f", combination_type="dare_linear", density=0.0)


def test_the_tuner_refuses_an_unknown_adapter_before_unmerging(dirs):
    model = get_peft_model(_base(dirs), S2FTConfig(task_type="CAUSAL_LM", init_weights=False))
    model.merge_adapter()
    with pytest.raises(ValueError, match="typo"):
        model.base_model.set_adapter("typo")
    assert model.active_adapters == ["default"]
    assert all(m.merged for m in model.modules() if hasattr(m, "s2ft_delta"))


def test_the_base_rows_name_is_not_an_adapter_name(dirs):
    model = get_peft_model(_base(dirs), S2FTConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="reserved"):
        model.add_adapter("__base__", S2FTConfig(task_type="CAUSAL_LM", seed=1))
    assert set(model.peft_config) == {"default"}


def test_fusing_adapters_of_two_dtypes_keeps_the_wider(dirs):
    model = get_peft_model(_base(dirs), S2FTConfig(task_type="CAUSAL_LM", init_weights=False), adapter_name="a")
    model.add_adapter("b", S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=1))
    for layer in model.modules():
        if hasattr(layer, "s2ft_delta") and "a" in layer.s2ft_delta:
            layer.s2ft_delta["a"].data = layer.s2ft_delta["a"].data.to(torch.bfloat16)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab")
    dtypes = {p.dtype for n, p in model.named_parameters() if "s2ft_delta.ab" in n}
    assert dtypes == {torch.float32}


def test_sampling_several_sequences_per_row_repeats_the_names(dirs):
    model = get_peft_model(_base(dirs), S2FTConfig(task_type="CAUSAL_LM", init_weights=False), adapter_name="a")
    model.eval()
    inputs = sample_input_ids("llama", batch=2, length=5)
    with torch.no_grad():
        out = model.generate(
            input_ids=inputs,
            adapter_names=["a", "__base__"],
            do_sample=True,
            num_return_sequences=2,
            max_new_tokens=2,
            pad_token_id=0,
        )
    assert out.shape[0] == 4
