import dataclasses
import json
import pickle

import pytest
from peft import PeftConfig, get_peft_model

from peft_s2ft import S2FTConfig
from peft_s2ft.selection import count_parameters


def test_every_field_has_help():
    own = {f.name for f in dataclasses.fields(S2FTConfig)} - {f.name for f in dataclasses.fields(PeftConfig)}
    for f in dataclasses.fields(S2FTConfig):
        if f.name in own:
            assert f.metadata.get("help"), f"field {f.name} has no help text"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"trainable_ratio": 0}, "trainable_ratio"),
        ({"trainable_ratio": 1.5}, "trainable_ratio"),
        ({"head_ratio": 0.0}, "head_ratio"),
        ({"channel_ratio": 2.0}, "channel_ratio"),
        ({"heads_per_layer": -1}, "heads_per_layer"),
        ({"heads_per_layer": 1.5}, "heads_per_layer"),
        ({"selection": "gradient"}, "selection"),
        ({"allocation": "per-block"}, "allocation"),
        ({"attention_share": 1.2}, "attention_share"),
        ({"heads_per_layer": 2, "head_ratio": 0.5}, "head_ratio"),
        ({"heads_per_layer": 0, "channels_per_layer": 0}, "channels_per_layer"),
        ({"layers_pattern": "layers"}, "layers_pattern"),
    ],
)
def test_impossible_values_fail_at_construction(kwargs, field):
    with pytest.raises(ValueError, match=rf"S2FTConfig\.{field}="):
        S2FTConfig(**kwargs)


def test_more_heads_than_the_layer_has_fails_before_touching_the_model(load):
    model = load("llama-gqa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="heads_per_layer=9.*only 4"):
        get_peft_model(model, S2FTConfig(heads_per_layer=9))
    assert all(type(m).__name__ != "S2FTLayer" for m in model.modules())
    assert all((before[k] == v).all() for k, v in model.state_dict().items())


def test_json_and_pickle_round_trip(tmp_path):
    config = S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=2, selection="weight_small", seed=7)
    config.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "adapter_config.json").read_text())
    assert stored["peft_type"] == "S2FT" and stored["heads_per_layer"] == 2
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, S2FTConfig) and loaded.to_dict() == config.to_dict()
    assert pickle.loads(pickle.dumps(config)).to_dict() == config.to_dict()


def test_default_is_about_one_percent_half_attention_half_ffn(load):
    from transformers import AutoModelForCausalLM, LlamaConfig

    # Wide enough that whole heads are a small unit of the budget.
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    model = AutoModelForCausalLM.from_config(config)
    total = count_parameters(model)
    peft_model = get_peft_model(model, S2FTConfig(task_type="CAUSAL_LM"))
    attention = sum(p.numel() for n, p in peft_model.named_parameters() if "o_proj.s2ft" in n)
    ffn = sum(p.numel() for n, p in peft_model.named_parameters() if "down_proj.s2ft" in n)
    assert 0.008 < (attention + ffn) / total < 0.012
    assert 0.8 < attention / ffn < 1.25
    per_layer = {n: p.shape for n, p in peft_model.named_parameters() if "s2ft_delta" in n}
    assert len({s for n, s in per_layer.items() if "o_proj" in n}) == 1  # same count per layer


def test_a_budget_larger_than_the_blocks_warns_and_trains_everything(load):
    # The tiny models are mostly embeddings: 30% of their parameters is more than all their heads hold.
    with pytest.warns(UserWarning, match="more than the 4 there are"):
        model = get_peft_model(load("llama-gqa"), S2FTConfig(trainable_ratio=0.3))
    o_proj = model.base_model.model.model.layers[0].self_attn.o_proj
    assert len(o_proj.s2ft_indices["default"]) == o_proj.in_features


def test_an_added_adapter_gets_the_budget_it_gets_alone(load):
    """The budget is a fraction of the base model's parameters: the first adapter's deltas must not enlarge it."""
    alone = get_peft_model(load("llama-gqa"), S2FTConfig(task_type="CAUSAL_LM", trainable_ratio=0.3, seed=1))
    shapes = {n: p.shape for n, p in alone.named_parameters() if "s2ft_delta" in n}
    model = get_peft_model(load("llama-gqa"), S2FTConfig(task_type="CAUSAL_LM", trainable_ratio=0.3))
    model.add_adapter("other", S2FTConfig(task_type="CAUSAL_LM", trainable_ratio=0.3, seed=1))
    added = {n.replace(".other", ".default"): p.shape for n, p in model.named_parameters() if "s2ft_delta.other" in n}
    assert added == shapes
