"""Properties that hold for every small configuration, checked on random tiny models (hypothesis)."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from peft_s2ft import S2FTConfig

LAYERS = 2


@st.composite
def cases(draw):
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([4, 8]))
    ffn = draw(st.sampled_from([12, 20, 33]))
    allocation = draw(st.sampled_from(["uniform", "global"]))
    scale = LAYERS if allocation == "global" else 1
    head_count = draw(st.integers(0, heads * scale))
    channel_count = draw(st.integers(1 if head_count == 0 else 0, ffn * scale))
    model = LlamaConfig(
        vocab_size=48,
        hidden_size=heads * head_dim,
        head_dim=head_dim,
        intermediate_size=ffn,
        num_hidden_layers=LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=False,
    )
    adapter = dict(
        heads_per_layer=head_count,
        channels_per_layer=channel_count,
        selection=draw(st.sampled_from(["random", "weight_large", "weight_small"])),
        allocation=allocation,
        permute=draw(st.booleans()),
        train_v=head_count > 0 and draw(st.booleans()),
        train_up=channel_count > 0 and draw(st.booleans()),
        seed=draw(st.integers(0, 1000)),
    )
    return model, adapter, draw(st.sampled_from([torch.float32, torch.bfloat16]))


def _close(a, b, dtype):
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(a, b, **tolerance)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_s2ft_invariants(case):
    model_config, adapter, dtype = case
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(model_config).to(dtype).eval()
    pristine = copy.deepcopy(base)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    ids = torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = base(ids).logits

    # Identity at init (co-permutation included: it must preserve the function).
    model = get_peft_model(base, S2FTConfig(task_type="CAUSAL_LM", **adapter))
    _close(model(ids).logits, expected, dtype)
    for delta in (p for n, p in model.named_parameters() if "s2ft_delta" in n):
        with torch.no_grad():
            delta.normal_(std=0.2)
    adapted = model(ids).logits

    with tempfile.TemporaryDirectory() as folder:
        # save -> load on a fresh base reproduces the logits, in the same mode and in the other mode.
        model.save_pretrained(folder)
        _close(PeftModel.from_pretrained(copy.deepcopy(pristine), folder)(ids).logits, adapted, dtype)
        config_file = Path(folder) / "adapter_config.json"
        stored = json.loads(config_file.read_text())
        other_mode = not stored["permute"]
        if not other_mode or _permutable(model_config, folder):
            config_file.write_text(json.dumps(stored | {"permute": other_mode}))
            _close(PeftModel.from_pretrained(copy.deepcopy(pristine), folder)(ids).logits, adapted, dtype)

    merged = copy.deepcopy(model).merge_and_unload()
    _close(merged(ids).logits, adapted, dtype)
    unloaded = model.unload()
    for key, value in unloaded.state_dict().items():
        assert torch.equal(value, original[key]), key


def _permutable(model_config: LlamaConfig, folder: str) -> bool:
    """Permute mode needs every layer's heads to touch at most one partly selected K/V group."""
    from safetensors.torch import load_file

    group = model_config.num_attention_heads // model_config.num_key_value_heads
    for key, indices in load_file(Path(folder) / "adapter_model.safetensors").items():
        if key.endswith("o_proj.s2ft_indices"):
            heads = set((indices // model_config.head_dim).tolist())
            groups = range(model_config.num_key_value_heads)
            counts = [sum(h in heads for h in range(g * group, (g + 1) * group)) for g in groups]
            if sum(0 < c < group for c in counts) > 1:
                return False
    return True
