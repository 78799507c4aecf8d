"""S2FT with FSDP2 (`torch.distributed.fsdp.fully_shard`), launched by torchrun.

    torchrun --nproc-per-node 8 examples/fsdp2_train.py --model meta-llama/Llama-3.1-8B-Instruct --bf16
    torchrun --standalone --nproc-per-node 2 examples/fsdp2_train.py --max-steps 2   # CPU (gloo), the embedded model

Every decoder layer is one FSDP unit that holds its frozen weights and its S2FT deltas, both sharded over the ranks.
The adapter is gathered into a full state dict on rank 0, which saves it with `save_pretrained`; it loads like any
PEFT adapter. The data are reasoning-gym's GSM8K-style problems (as `peft-s2ft train` uses), with the prompt tokens
masked out of the loss. docs/distributed.md explains the choices.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.data import DataLoader, DistributedSampler
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_s2ft  # registers S2FT with PEFT
from peft_s2ft.train.embedded_model import resolve_model
from peft_s2ft.train.task import CompletionCollator, encode_split, gsm_symbolic


def shard(model: torch.nn.Module, bf16: bool) -> None:
    """One FSDP unit per decoder layer (the classes transformers lists in `_no_split_modules`), then the root."""
    # Frozen base weights in bf16 and trainable deltas in fp32 (PEFT upcasts adapters) share a unit: FSDP2 gathers
    # both in param_dtype and reduces the deltas' gradients in fp32 into their fp32 shards.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mp_policy": policy} if policy else {}
    layer_classes = set(model.base_model.model._no_split_modules or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"{type(model.base_model.model).__name__} names no decoder layer class in _no_split_modules")
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id or folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--bf16", action="store_true", help="compute in bf16 (GPUs); the deltas stay fp32")
    parser.add_argument("--output-dir", default="outputs/fsdp2-s2ft")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")

    source = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    # Every rank must select the same heads and channels: the default random selection is seeded by the config.
    model = get_peft_model(model, peft_s2ft.S2FTConfig(task_type="CAUSAL_LM"))
    if rank == 0:
        model.print_trainable_parameters()
    shard(model, args.bf16)  # moves each rank's shards (and the index buffers) to its device

    train, _ = gsm_symbolic(train_size=args.batch_size * world * args.max_steps, eval_size=0, seed=0)
    rows, dropped = encode_split(tokenizer, train, args.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = DataLoader(
        rows,
        batch_size=args.batch_size,
        sampler=DistributedSampler(rows, num_replicas=world, rank=rank, shuffle=True, seed=0),
        collate_fn=CompletionCollator(pad),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    for step, batch in enumerate(loader):
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        dist.all_reduce(loss)  # a sum: gloo has no average
        if rank == 0:
            print(f"step {step + 1}/{len(loader)}  loss {loss.item() / world:.4f}")

    # All ranks gather; with cpu_offload only rank 0 receives the full tensors (on the CPU), and it alone saves.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(args.output_dir, state_dict=state)
        print(f"adapter saved to {args.output_dir} ({dropped} examples longer than --max-length were skipped)")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
