"""Supervised fine-tuning with TRL's SFTTrainer and S2FT: the LoRA recipe with one line changed.

    python examples/trl_sft.py                      # the embedded SmolLM2-135M-Instruct, offline, a few minutes
    python examples/trl_sft.py --model HuggingFaceTB/SmolLM2-360M-Instruct --max-steps 200

The data are reasoning-gym's GSM8K-style problems (as `peft-s2ft train` uses), in TRL's prompt/completion
conversational format; TRL applies the chat template and trains on the completions only.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import peft_s2ft  # registers S2FT with PEFT
from peft_s2ft.train.embedded_model import resolve_model
from peft_s2ft.train.task import gsm_symbolic


def conversations(split) -> Dataset:
    return Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}]}
            for p, c in zip(split.prompts, split.completions, strict=True)
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id or folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output-dir", default="outputs/trl-s2ft")
    args = parser.parse_args()

    source = resolve_model(args.model)
    on_gpu = torch.cuda.is_available()
    train, _ = gsm_symbolic(train_size=args.batch_size * args.max_steps, eval_size=0, seed=0)
    trainer = SFTTrainer(
        model=source,  # TRL loads it; a model instance works as well
        args=SFTConfig(
            output_dir=args.output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=3e-3,  # S2FT trains few parameters: a LoRA-like rate, higher than full fine-tuning's
            lr_scheduler_type="linear",
            logging_steps=max(1, args.max_steps // 4),
            save_strategy="no",
            report_to=[],
            max_length=512,
            use_cpu=not on_gpu,
            bf16=on_gpu,  # SFTConfig's default is bf16; on a CPU, fp32 is many times faster
            model_init_kwargs={"dtype": torch.bfloat16 if on_gpu else torch.float32},
        ),
        train_dataset=conversations(train),
        processing_class=AutoTokenizer.from_pretrained(source),
        # With LoRA this line would read: peft_config=LoraConfig(r=16, target_modules="all-linear", ...)
        peft_config=peft_s2ft.S2FTConfig(task_type="CAUSAL_LM"),
    )
    trainer.model.print_trainable_parameters()
    trainer.train()
    trainer.save_model(args.output_dir)

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source), args.output_dir)
    print(f"adapter saved to {args.output_dir} and reloaded: {type(reloaded.peft_config['default']).__name__}")


if __name__ == "__main__":
    main()
