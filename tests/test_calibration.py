"""Data-driven selection (S2FT-A / S2FT-S / S2FT-G): scores equal a direct computation, each strategy selects what
its name says, the adapter file carries the selection, and every missing or mismatched calibration is refused."""

from __future__ import annotations

import families
import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model, inject_adapter_in_model, set_peft_model_state_dict

from peft_s2ft import S2FTConfig, calibrate_selection
from peft_s2ft.architectures import describe
from peft_s2ft.calibration import DATA_DRIVEN
from peft_s2ft.layer import S2FTLayer

ROWS, LENGTH = 3, 9


def _batches(count: int = 2, pad: bool = True) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, 64, (ROWS, LENGTH), generator=generator)
        mask = torch.ones_like(ids)
        if pad:
            mask[1, 6:] = 0  # right padding: the causal model's other positions do not see it
            mask[2, 4:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _unpadded_rows(batches):
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            yield ids[mask.bool()][None]


def _direct_column_squares(model, inputs) -> dict[str, torch.Tensor]:
    """x_c² summed over every token, from the FFN's own input (down's input is act(gate x) * up x) and from the
    o_proj input captured on unpadded sequences run one at a time."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for layer_path, layer in [(f"model.layers.{i}", m) for i, m in enumerate(model.model.layers)]:

        def ffn_hook(module, args, path=f"{layer_path}.mlp.down_proj"):
            x = args[0]
            inner = module.act_fn(module.gate_proj(x)) * module.up_proj(x)
            sums[path] = sums.get(path, 0) + inner.reshape(-1, inner.shape[-1]).double().square().sum(0)

        def o_hook(module, args, path=f"{layer_path}.self_attn.o_proj"):
            x = args[0]
            sums[path] = sums.get(path, 0) + x.reshape(-1, x.shape[-1]).double().square().sum(0)

        hooks += [
            layer.mlp.register_forward_pre_hook(ffn_hook),
            layer.self_attn.o_proj.register_forward_pre_hook(o_hook),
        ]
    with torch.no_grad():
        for ids in inputs:
            model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return sums


def test_activation_sums_equal_a_direct_computation_and_leave_padding_out(load):
    model = load("llama-gqa")
    batches = _batches()
    scores = calibrate_selection(model, S2FTConfig(selection="activation_large"), batches, progress=False)
    direct = _direct_column_squares(model, _unpadded_rows(batches))
    assert scores.statistic == "activation" and scores.batches == 2
    assert scores.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    assert set(scores.columns) == set(direct)
    for key, expected in direct.items():
        torch.testing.assert_close(scores.columns[key].double(), expected, rtol=1e-5, atol=1e-6)


def test_gradient_sums_equal_per_batch_autograd(load):
    model = load("llama-gqa")
    batches = _batches()
    scores = calibrate_selection(model, S2FTConfig(selection="gradient_small"), batches, progress=False)
    reference = load("llama-gqa").eval()
    expected: dict[str, torch.Tensor] = {}
    for batch in batches:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        reference.zero_grad()
        reference(**batch, labels=labels).loss.backward()
        for name, module in reference.named_modules():
            if name.endswith(("o_proj", "down_proj")):
                expected[name] = expected.get(name, 0) + module.weight.grad.double().square().sum(0)
    assert scores.statistic == "gradient"
    for key, value in expected.items():
        torch.testing.assert_close(scores.columns[key].double(), value, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("strategy", ["activation_large", "gradient_large"])
def test_calibration_changes_no_weight_flag_gradient_or_mode(load, strategy):
    model = load("llama-gqa").train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    model.lm_head.weight.grad = torch.full_like(model.lm_head.weight, 0.5)  # a gradient accumulated before
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    calibrate_selection(model, S2FTConfig(selection=strategy), _batches(), progress=False)
    assert model.training
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert torch.equal(model.lm_head.weight.grad, torch.full_like(model.lm_head.weight, 0.5))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "lm_head.weight")
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())


def test_a_model_holding_adapters_is_scored_as_it_runs(load):
    """A second data-driven adapter: calibrated on the PeftModel, whose layers are S2FT wrappers."""
    plain = load("llama-gqa")
    reference = calibrate_selection(plain, S2FTConfig(selection="gradient_large"), _batches(), progress=False)
    peft_model = get_peft_model(load("llama-gqa"), S2FTConfig())  # a zero delta: the same function
    for strategy in ("gradient_large", "activation_large"):
        config = S2FTConfig(selection=strategy, heads_per_layer=1, channels_per_layer=4)
        scores = calibrate_selection(peft_model, config, _batches(), progress=False)
        assert set(scores.columns) == set(reference.columns)  # keys of the transformers model, not the PeftModel
        if strategy == "gradient_large":
            for key, total in reference.columns.items():
                torch.testing.assert_close(scores.columns[key], total, rtol=1e-4, atol=1e-10)
        peft_model.add_adapter(strategy, config)
        assert strategy in peft_model.peft_config


def test_batches_without_supervised_tokens_are_skipped_not_nan(load):
    batches = _batches()
    unsupervised = dict(batches[0], labels=torch.full_like(batches[0]["input_ids"], -100))
    scores = calibrate_selection(
        load("llama-gqa"), S2FTConfig(selection="gradient_small"), [unsupervised, batches[1]], progress=False
    )
    assert scores.batches == 1
    assert all(torch.isfinite(total).all() for total in scores.columns.values())
    with pytest.raises(ValueError, match="no batches it could use"):
        calibrate_selection(load("llama-gqa"), S2FTConfig(selection="gradient_small"), [unsupervised], progress=False)


def test_max_batches_stops_early(load):
    scores = calibrate_selection(
        load("llama-gqa"), S2FTConfig(selection="activation_small"), _batches(3), max_batches=2, progress=False
    )
    assert scores.batches == 2


def test_a_mask_that_does_not_describe_the_input_is_refused(load):
    batch = _batches(1)[0]
    batch["attention_mask"] = batch["attention_mask"][:, :-1]
    with pytest.raises(ValueError, match="attention_mask .* does not describe"):
        calibrate_selection(load("llama-gqa"), S2FTConfig(selection="activation_small"), [batch], progress=False)


def test_conv1d_models_calibrate_and_select(tmp_path):
    path = families.build("gpt2", tmp_path)
    for strategy in ("activation_small", "gradient_large", "weight_activation_large"):
        model = families.load(path, "gpt2")
        config = S2FTConfig(selection=strategy)
        ids = families.sample_input_ids("gpt2")
        calibrate_selection(model, config, [{"input_ids": ids}], progress=False)
        assert get_peft_model(model, config).peft_config["default"].calibration["batches"] == 1


def _unit_norms(columns: torch.Tensor, width: int) -> torch.Tensor:
    return columns.double().reshape(-1, width).sum(dim=1).sqrt()


@pytest.mark.parametrize("strategy", list(DATA_DRIVEN))
def test_each_strategy_selects_the_extreme_scores(load, strategy):
    model = load("llama-mha")
    config = S2FTConfig(selection=strategy, heads_per_layer=1, channels_per_layer=5)
    scores = calibrate_selection(model, config, _batches(), progress=False)
    structure = describe(model)
    expected = {}
    for block in structure.attention + structure.ffn:
        module = model.get_submodule(block.key)
        width = module.in_features // block.num_units
        columns = scores.columns[block.key].double()
        if strategy.startswith("weight_activation"):
            columns = columns * module.weight.detach().double().square().sum(dim=0)
        norms = _unit_norms(columns, width)
        count = 1 if block.kind == "attention" else 5
        order = torch.argsort(norms, descending=strategy.endswith("_large"))
        expected[block.key] = torch.cat(
            [torch.arange(u * width, (u + 1) * width) for u in sorted(order[:count].tolist())]
        )
    peft_model = get_peft_model(model, config)
    for key, indices in expected.items():
        layer = peft_model.base_model.model.get_submodule(key)
        assert isinstance(layer, S2FTLayer)
        assert torch.equal(layer.s2ft_indices["default"], indices), key


def test_a_small_strategy_and_its_large_twin_pick_different_units(load):
    model = load("llama-mha")
    picked = []
    for strategy in ("activation_large", "activation_small"):
        config = S2FTConfig(selection=strategy, heads_per_layer=1, channels_per_layer=5)
        calibrate_selection(model, config, _batches(), progress=False)
        peft_model = get_peft_model(load("llama-mha"), config)
        layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
        picked.append(set(layer.s2ft_indices["default"].tolist()))
    assert not picked[0] & picked[1]


def test_a_data_driven_strategy_without_calibration_is_refused_and_leaves_the_model(load):
    model = load("llama-gqa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"selection='activation_small'.*calibrate_selection\(model, config, batches\)"
    ):
        get_peft_model(model, S2FTConfig(selection="activation_small"))
    assert not any(isinstance(m, S2FTLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_scores_of_another_model_or_statistic_are_refused(load):
    config = S2FTConfig(selection="activation_small")
    calibrate_selection(load("llama-gqa"), config, _batches(), progress=False)
    other = load("llama-gqa")
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[0, 0] += 1  # the same shapes, another weight
    for model in (other, load("llama-mha")):
        with pytest.raises(ValueError, match="computed on another model"):
            get_peft_model(model, config)
    config.selection = "gradient_small"
    with pytest.raises(ValueError, match="needs gradient statistics.*calibrated for activation"):
        get_peft_model(load("llama-gqa"), config)


def test_calibrating_a_strategy_that_reads_no_data_is_refused(load):
    with pytest.raises(ValueError, match="does not read data"):
        calibrate_selection(load("llama-gqa"), S2FTConfig(), _batches(), progress=False)
    with pytest.raises(ValueError, match="got no batches"):
        calibrate_selection(load("llama-gqa"), S2FTConfig(selection="activation_small"), [], progress=False)


def test_fused_experts_are_not_scored_and_selecting_them_is_refused(tmp_path):
    path = families.build("mixtral", tmp_path)
    model = families.load(path, "mixtral")
    ids = families.sample_input_ids("mixtral")
    config = S2FTConfig(selection="activation_small")
    scores = calibrate_selection(model, config, [{"input_ids": ids}], progress=False)
    assert scores.columns and not any("experts" in key for key in scores.columns)
    with pytest.raises(ValueError, match="not the channels inside fused experts"):
        get_peft_model(model, config)
    attention_only = S2FTConfig(selection="activation_small", attention_share=1.0)
    calibrate_selection(model, attention_only, [{"input_ids": ids}], progress=False)
    assert get_peft_model(model, attention_only).peft_config["default"].selection == "activation_small"


def _calibrated_adapter(load, tmp_path):
    model = load("llama-gqa")
    config = S2FTConfig(selection="activation_small", init_weights=False)
    calibrate_selection(model, config, _batches(), progress=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path)
    ids = _batches(1, pad=False)[0]["input_ids"]
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    return ids, logits, _indices(peft_model)


def _indices(model) -> dict[str, list[int]]:
    """Each S2FT layer's indices of the default adapter, by module path in the transformers model."""
    return {
        n.removeprefix("base_model.model."): m.s2ft_indices["default"].tolist()
        for n, m in model.named_modules()
        if isinstance(m, S2FTLayer)
    }


def test_the_file_holds_the_selection_so_loading_needs_no_data(load, tmp_path):
    ids, logits, indices = _calibrated_adapter(load, tmp_path)
    saved = PeftConfig.from_pretrained(tmp_path)
    tokens = sum(int(b["attention_mask"].sum()) for b in _batches())
    assert saved.calibration == {"statistic": "activation", "batches": 2, "tokens": tokens}
    loaded = PeftModel.from_pretrained(load("llama-gqa"), tmp_path)
    assert _indices(loaded) == indices
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, rtol=0, atol=0)


def test_transformers_load_adapter_takes_the_file_selection(load, tmp_path):
    ids, logits, indices = _calibrated_adapter(load, tmp_path)
    model = load("llama-gqa")
    model.load_adapter(str(tmp_path))
    assert _indices(model) == indices
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=0, atol=0)


def test_a_read_config_injected_without_its_file_refuses_to_run_until_loaded(load, tmp_path):
    ids, logits, _ = _calibrated_adapter(load, tmp_path)
    model = load("llama-gqa")
    inject_adapter_in_model(PeftConfig.from_pretrained(tmp_path), model)  # the first half of transformers' load
    with pytest.raises(RuntimeError, match="takes its heads and channels from its adapter file"):
        model(input_ids=ids)
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(tmp_path / "adapter_model.safetensors"))  # a low-level load
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=0, atol=0)


def test_a_failed_load_leaves_no_refusal_behind(load, tmp_path):
    ids, logits, _ = _calibrated_adapter(load, tmp_path)
    broken = tmp_path / "config-only"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((tmp_path / "adapter_config.json").read_text())
    model = load("llama-gqa")
    with pytest.raises((OSError, ValueError)):
        model.load_adapter(str(broken))
    if "default" in getattr(model, "peft_config", {}):
        model.delete_adapter("default")
    model.load_adapter(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=0, atol=0)


def test_a_read_config_without_its_folder_is_not_a_selection(load, tmp_path):
    _calibrated_adapter(load, tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)  # the calibration record, not the scores nor the folder
    with pytest.raises(ValueError, match="this config has none"):
        get_peft_model(load("llama-gqa"), config)


def test_calibrating_a_read_config_asks_for_a_fresh_selection(load, tmp_path):
    _, _, file_indices = _calibrated_adapter(load, tmp_path)
    config = S2FTConfig.from_pretrained(tmp_path)
    assert "_adapter_source" in vars(config)
    other_batches = [{"input_ids": torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(9))}]
    calibrate_selection(load("llama-gqa"), config, other_batches, progress=False)  # the selection field unchanged
    assert "_adapter_source" not in vars(config)
    reference = S2FTConfig(selection="activation_small", init_weights=False)
    calibrate_selection(load("llama-gqa"), reference, other_batches, progress=False)
    expected = _indices(get_peft_model(load("llama-gqa"), reference))
    assert expected != file_indices  # else the test could not tell
    assert _indices(get_peft_model(load("llama-gqa"), config)) == expected


def test_the_readme_snippet_runs(load):
    import re
    from pathlib import Path

    import peft_s2ft

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = re.search(r"The data-driven selections of the paper.*?```python\n(.*?)```", readme, re.S).group(1)
    namespace = {"model": load("llama-gqa"), "batches": _batches(), "S2FTConfig": S2FTConfig}
    namespace |= {"peft_s2ft": peft_s2ft, "get_peft_model": get_peft_model}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["model"].peft_config["default"].calibration["statistic"] == "activation"
