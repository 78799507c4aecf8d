"""QS2FT: S2FT on a 4-bit (nf4) base, QLoRA's recipe with the LoRA config swapped for an S2FT one.

    python examples/qs2ft_train.py                  # the embedded SmolLM2-135M-Instruct, offline, minutes on a CPU
    python examples/qs2ft_train.py --model HuggingFaceTB/SmolLM2-360M-Instruct --max-steps 100

The base is quantized by bitsandbytes while it loads and never changes; S2FT trains float32 deltas on a few heads'
and FFN channels' columns of the output projections. The adapter saves like any other and reloads onto a fresh 4-bit
base (or a float one). Needs `pip install "peft-s2ft[quant]"`.
"""

from __future__ import annotations

import argparse

import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import peft_s2ft  # registers S2FT with PEFT
from peft_s2ft.train.embedded_model import resolve_model
from peft_s2ft.train.task import gsm_symbolic


def load_4bit(source: str) -> AutoModelForCausalLM:
    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32  # bf16 matmuls are slow on most CPUs
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    return AutoModelForCausalLM.from_pretrained(source, quantization_config=quantization, dtype=compute)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id or folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output-dir", default="outputs/qs2ft")
    args = parser.parse_args()

    source = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = prepare_model_for_kbit_training(load_4bit(source))  # frozen base, gradient checkpointing, input grads
    # With QLoRA this line would read: get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", ...))
    model = get_peft_model(model, peft_s2ft.S2FTConfig(task_type="CAUSAL_LM"))
    model.print_trainable_parameters()

    train, _ = gsm_symbolic(train_size=args.batch_size * args.max_steps, eval_size=0, seed=0)
    texts = [p + c for p, c in zip(train.prompts, train.completions, strict=True)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(args.max_steps):
        rows = texts[step * args.batch_size : (step + 1) * args.batch_size]
        batch = tokenizer(rows, return_tensors="pt", padding=True, truncation=True, max_length=256).to(model.device)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step + 1}/{args.max_steps}: loss {loss.item():.3f}")

    model.save_pretrained(args.output_dir)
    reloaded = PeftModel.from_pretrained(load_4bit(source), args.output_dir)
    layers = [m for m in reloaded.modules() if isinstance(m, peft_s2ft.layer.QuantizedS2FTLayer)]
    print(f"adapter saved to {args.output_dir} and reloaded onto a fresh 4-bit base: {len(layers)} QS2FT layers")


if __name__ == "__main__":
    main()
