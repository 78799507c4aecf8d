"""S2FT with DeepSpeed ZeRO through transformers.Trainer.

    deepspeed --num_gpus 8 examples/deepspeed_train.py --model meta-llama/Llama-3.1-8B-Instruct
    torchrun --nproc-per-node 8 examples/deepspeed_train.py --deepspeed examples/ds_zero2.json
    torchrun --standalone --nproc-per-node 2 examples/deepspeed_train.py --max-steps 2   # CPU (gloo), embedded model

ZeRO-3 (the default config, examples/ds_zero3.json) partitions the model while `from_pretrained` loads it, because
the TrainingArguments with the config exist first; S2FT is attached to the partitioned model and `save_model`
gathers the trained deltas into an ordinary adapter folder. The data are reasoning-gym's GSM8K-style problems (as
`peft-s2ft train` uses), with the prompt tokens masked out of the loss. docs/distributed.md explains the choices.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import peft_s2ft  # registers S2FT with PEFT
from peft_s2ft.train.embedded_model import resolve_model
from peft_s2ft.train.task import CompletionCollator, encode_split, gsm_symbolic


def configure_cpu_processes() -> None:
    """CPU runs only. Without a GPU, accelerate picks no backend under DeepSpeed and reports a single process, so
    every rank would get the same batches while DeepSpeed averages over all of them. Naming gloo first gives
    accelerate the real world size; the TrainingArguments below then use this state."""
    from accelerate.state import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id or folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--deepspeed", default=str(Path(__file__).with_name("ds_zero3.json")), help="ZeRO config")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--output-dir", default="outputs/deepspeed-s2ft")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed's
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    if not on_gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        configure_cpu_processes()
    # Created before the model: with a ZeRO-3 config, from_pretrained then loads straight into partitions.
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        deepspeed=args.deepspeed,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=3e-3,  # S2FT trains few parameters: a LoRA-like rate, higher than full fine-tuning's
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=on_gpu,
        accelerator_config=None if on_gpu else {"use_configured_state": True},
    )
    source = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16 if on_gpu else torch.float32)
    # Every rank selects the same heads and channels: the default random selection is seeded by the config.
    # (Under ZeRO-3 the weights are partitioned here, so weight-scored selections and permute=True are refused.)
    model = get_peft_model(model, peft_s2ft.S2FTConfig(task_type="CAUSAL_LM"))

    train, _ = gsm_symbolic(train_size=args.batch_size * training_args.world_size * args.max_steps, eval_size=0, seed=0)
    rows, _ = encode_split(tokenizer, train, args.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer = Trainer(model=model, args=training_args, train_dataset=rows, data_collator=CompletionCollator(pad))
    trainer.train()
    trainer.save_model(args.output_dir)  # every rank takes part (ZeRO-3 gathers the deltas); rank 0 writes
    if trainer.is_world_process_zero():
        print(f"adapter saved to {args.output_dir}")


if __name__ == "__main__":
    main()
