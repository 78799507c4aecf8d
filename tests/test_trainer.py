"""transformers.Trainer: trains only adapter tensors, checkpoints the adapter, and resumes."""

import os

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from peft_s2ft import S2FTConfig


def _dataset() -> Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (16, 12), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _args(output_dir, max_steps):
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        gradient_accumulation_steps=2,
        max_grad_norm=1.0,
        disable_tqdm=True,
    )


@pytest.mark.parametrize("permute", [False, True])
def test_trainer_trains_saves_and_resumes(load, tmp_path, input_ids, permute):
    model = get_peft_model(load("llama-gqa"), S2FTConfig(task_type="CAUSAL_LM", permute=permute, heads_per_layer=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_before = {k: v.clone() for k, v in model.base_model.model.state_dict().items() if "s2ft_" not in k}
    trainer = Trainer(model=model, args=_args(tmp_path, 4), train_dataset=_dataset())
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    if permute:  # the trained block lives merged in the (co-permuted) base weight
        changed = {n for n in changed if "base_layer" not in n}
    assert changed and all("s2ft_delta" in n for n in changed)
    if not permute:
        for key, value in model.base_model.model.state_dict().items():
            if "s2ft_" not in key:
                assert torch.equal(value, base_before[key]), key

    checkpoint = tmp_path / "checkpoint-4"
    assert (checkpoint / "adapter_model.safetensors").exists()
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in os.listdir(checkpoint))
    trained = model(input_ids).logits
    reloaded = PeftModel.from_pretrained(load("llama-gqa"), checkpoint)
    torch.testing.assert_close(reloaded(input_ids).logits, trained, atol=1e-5, rtol=1e-5)

    # Resuming from step 2 reaches exactly the adapter of the uninterrupted run.
    resumed_model = get_peft_model(
        load("llama-gqa"), S2FTConfig(task_type="CAUSAL_LM", permute=permute, heads_per_layer=2)
    )
    resumed = Trainer(model=resumed_model, args=_args(tmp_path, 4), train_dataset=_dataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    deltas = {n: p for n, p in model.named_parameters() if "s2ft_delta" in n}
    for name, param in resumed_model.named_parameters():
        if "s2ft_delta" in name:
            assert torch.equal(param, deltas[name]), name
    assert torch.equal(resumed_model(input_ids).logits, trained)
