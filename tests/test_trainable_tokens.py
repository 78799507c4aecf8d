"""`S2FTConfig(trainable_token_indices=...)`: a few embedding rows train beside the S2FT deltas, as with LoRA.

TRL's SFTTrainer sets this field when `chat_template_path` clones a template whose special tokens the tokenizer
lacks; before the field existed that path failed with an AttributeError.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_chat import save_tiny_llama, tiny_chat_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_s2ft import S2FTConfig

TOKENS = [3, 4]
IDS = torch.tensor([[3, 4, 5, 6, 7, 3]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(save_tiny_llama(tmp_path_factory.mktemp("tokens-llama")))


def _trained(tiny: str):
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny), S2FTConfig(task_type="CAUSAL_LM", trainable_token_indices=TOKENS)
    )
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    return model.eval()


def test_only_the_chosen_rows_and_the_deltas_train(tiny):
    base = AutoModelForCausalLM.from_pretrained(tiny)
    model = _trained(tiny)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("trainable_tokens_delta" in n for n in trainable)
    assert all("trainable_tokens_delta" in n or ".s2ft_delta." in n for n in trainable)
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        rows = embedding(torch.arange(base.config.vocab_size)) - base.get_input_embeddings().weight
    changed = rows.abs().sum(-1).nonzero().flatten().tolist()
    assert changed == TOKENS


def test_the_rows_are_saved_reloaded_and_merged(tiny, tmp_path):
    model = _trained(tiny)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"].shape[0] == len(TOKENS)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, expected, rtol=0, atol=0)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, rtol=1e-5, atol=1e-5)


def _untied(tiny: str, folder) -> str:
    """The tiny model with its own lm_head. TRL's fused LM-head loss reads `lm_head.weight` and `.bias` directly,
    which a tied head wrapped by PEFT's TrainableTokensWrapper lacks: it fails for LoRA the same way."""
    model = AutoModelForCausalLM.from_pretrained(tiny)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    return str(folder)


def test_trl_cloned_chat_template_adds_tokens_that_train(tiny, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tiny = _untied(tiny, tmp_path / "untied")

    # A template source whose special tokens the tiny tokenizer does not have: TRL adds them, resizes the
    # embedding and asks the PEFT config to train their rows (and lm_head).
    source = tiny_chat_tokenizer()
    source.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    source.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    source.eos_token = "<|im_end|>"
    source.save_pretrained(tmp_path / "template")
    rows = [
        {
            "prompt": [{"role": "user", "content": f"{a}+{b}="}],
            "completion": [{"role": "assistant", "content": f"{a + b}"}],
        }
        for a in range(3)
        for b in range(3)
    ]
    args = SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=3,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        max_length=64,
        chat_template_path=str(tmp_path / "template"),
        disable_tqdm=True,
    )
    config = S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=1, channels_per_layer=8)
    trainer = SFTTrainer(
        model=tiny,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(tiny),
        peft_config=config,
    )
    added = trainer.model.peft_config["default"].trainable_token_indices["embed_tokens"]
    tokenizer = trainer.processing_class
    assert set(added) >= set(tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]))
    trainer.train()
    model = trainer.model.eval()
    trainer.save_model(str(tmp_path / "adapter"))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "1+2="}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert set(added) & set(ids.flatten().tolist())  # the prompt uses the new tokens
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(tiny)
    base.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)  # as TRL resized it
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
