"""TRL's SFTTrainer with `peft_config=S2FTConfig(...)`, the one line a LoRA user changes: TRL calls get_peft_model
itself, turns gradient checkpointing on by default and computes its own loss; S2FT trains only its deltas there,
and the saved adapter reloads to the trained model's logits."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from datasets import Dataset
from examples_runner import run_example
from peft import PeftModel
from tiny_chat import save_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from peft_s2ft import S2FTConfig


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(save_tiny_llama(tmp_path_factory.mktemp("trl-llama")))


def _dataset() -> Dataset:
    rows = [
        {
            "prompt": [{"role": "user", "content": f"{a}+{b}="}],
            "completion": [{"role": "assistant", "content": str(a + b)}],
        }
        for a in range(4)
        for b in range(4)
    ]
    return Dataset.from_list(rows)


def _base_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


@pytest.mark.parametrize(
    ("model_as", "checkpointing"), [("path", False), ("model", True)], ids=["trl-loads-the-model", "checkpointing"]
)
def test_sft_trainer_trains_only_the_deltas_and_saves_a_reloadable_adapter(tiny, tmp_path, model_as, checkpointing):
    base = AutoModelForCausalLM.from_pretrained(tiny)
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    args = SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        max_length=64,
        gradient_checkpointing=checkpointing,
        bf16=False,  # SFTConfig's default; on CPU it would train under bf16 autocast
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=tiny if model_as == "path" else base,
        args=args,
        train_dataset=_dataset(),
        processing_class=AutoTokenizer.from_pretrained(tiny),
        peft_config=S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=1, channels_per_layer=8),
    )
    model = trainer.model
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type == "S2FT"
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".s2ft_delta." in name for name in trainable)
    trainer.train()

    deltas = {name: p for name, p in model.named_parameters() if ".s2ft_delta." in name}
    assert all(p.abs().sum() > 0 for p in deltas.values())  # every delta learned
    for name, p in model.named_parameters():
        if name not in deltas:
            assert torch.equal(p.detach().cpu().float(), before[_base_name(name)].float()), name

    trainer.save_model(str(tmp_path / "adapter"))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), tmp_path / "adapter")
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "says"),
    [("trl_sft.py", "reloaded: S2FTConfig"), ("trainer_train.py", "the reload reproduces the trained logits: True")],
)
def test_the_example_runs_on_the_embedded_model(tmp_path, script, says):
    assert says in run_example(script, tmp_path / "adapter", "--batch-size", "2")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed ([quant])")
def test_sft_trainer_on_a_4bit_base_trains_the_deltas_it_casts_to_bf16(tiny, tmp_path):
    """QLoRA's recipe with S2FT: TRL casts the trainable parameters of a quantized model to bf16 (the QLoRA paper's
    choice); S2FT's deltas train in that dtype on top of the untouched 4-bit weights and reload exactly."""
    from peft import prepare_model_for_kbit_training
    from test_quantized import assert_same_storage, load_quantized, quantized_storage

    model = prepare_model_for_kbit_training(load_quantized(tiny, "nf4"))  # with gradient checkpointing
    storage = quantized_storage(model)
    args = SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        max_length=64,
        gradient_checkpointing=True,  # TRL's default
        bf16=False,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=_dataset(),
        processing_class=AutoTokenizer.from_pretrained(tiny),
        peft_config=S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=1, channels_per_layer=8),
    )
    peft_model = trainer.model
    deltas = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    assert deltas and all(".s2ft_delta." in n and p.dtype == torch.bfloat16 for n, p in deltas.items())
    trainer.train()
    assert all(p.abs().sum() > 0 for p in deltas.values())
    assert_same_storage(storage, quantized_storage(peft_model.base_model.model))

    trainer.save_model(str(tmp_path / "adapter"))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    # train mode (no dropout in this model): bitsandbytes would repack 4-bit weights for CPU inference in eval mode
    with torch.no_grad():
        expected = peft_model.train()(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(load_quantized(tiny, "nf4"), tmp_path / "adapter").train()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)
