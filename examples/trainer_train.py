"""Fine-tuning with transformers.Trainer and S2FT: the LoRA recipe with the config line changed.

    python examples/trainer_train.py                 # the embedded SmolLM2-135M-Instruct, offline, a few minutes
    python examples/trainer_train.py --model HuggingFaceTB/SmolLM2-360M-Instruct --max-steps 200

The data are reasoning-gym's GSM8K-style problems, tokenized with the chat template and labelled on the answer
only. The Trainer's checkpoints hold only the adapter; the saved adapter reloads onto a fresh base model.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import peft_s2ft  # registers S2FT with PEFT
from peft_s2ft.train.embedded_model import resolve_model
from peft_s2ft.train.task import CompletionCollator, encode_split, gsm_symbolic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id or folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output-dir", default="outputs/trainer-s2ft")
    args = parser.parse_args()

    source = resolve_model(args.model)
    on_gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    # With LoRA this line would read: get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", ...))
    model = get_peft_model(model, peft_s2ft.S2FTConfig(task_type="CAUSAL_LM"))
    model.print_trainable_parameters()

    train, _ = gsm_symbolic(train_size=args.batch_size * args.max_steps, eval_size=0, seed=0)
    rows, _ = encode_split(tokenizer, train, max_length=512)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=3e-3,  # S2FT trains few parameters: a LoRA-like rate, higher than full fine-tuning's
            lr_scheduler_type="linear",
            warmup_steps=0.1,
            logging_steps=max(1, args.max_steps // 4),
            save_strategy="no",
            report_to=[],
            use_cpu=not on_gpu,
            bf16=on_gpu,
            remove_unused_columns=False,  # the collator needs the token ids and labels as they are
        ),
        train_dataset=Dataset.from_list(rows),
        data_collator=CompletionCollator(tokenizer.pad_token_id),
    )
    trainer.train()
    model.save_pretrained(args.output_dir)

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source, dtype=dtype), args.output_dir)
    batch = CompletionCollator(tokenizer.pad_token_id)(rows[:2])
    model.eval()
    with torch.no_grad():
        inputs = {k: batch[k].to(model.device) for k in ("input_ids", "attention_mask")}
        same = torch.allclose(model(**inputs).logits, reloaded.to(model.device)(**inputs).logits, atol=1e-4)
    print(f"adapter saved to {args.output_dir}; the reload reproduces the trained logits: {same}")


if __name__ == "__main__":
    main()
