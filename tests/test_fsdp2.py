"""FSDP2 (`fully_shard`, 2 CPU processes over gloo): frozen base weights and trainable deltas sharded in the same
units train as on one process, and the adapter saved from rank 0's full state dict reloads as trained."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo_workers import WORLD, spawn, torchrun
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_s2ft import S2FTConfig

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="this torch build has no torch.distributed.fsdp")
if not dist.is_available() or not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch build has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)

MODES = (False, True)  # permute
STEPS = 3
MAX_NORM = 0.05  # below the gradients' norm (about 0.4 here): clipping acts, so the global norm must be right
# Measured on the 2-core CPU machine (torch 2.13, both modes): losses bitwise equal, deltas (about 0.03 in size) at
# most 9.3e-9 apart, reloaded logits at most 8.9e-8 apart. The tolerance leaves a margin over 100x for other kernels.
TOLERANCE = dict(atol=1e-6, rtol=1e-5)


def _peft_model(model_dir: str, permute: bool):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return get_peft_model(model, S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=2, permute=permute))


def _train(model, batches) -> list[float]:
    """STEPS AdamW steps with gradient clipping; `batches(step)` gives this process's input ids and how to turn its
    loss into the global one."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = batches(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_NORM)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach().clone())
    return losses


def _worker(rank: int, model_dir: str, batch: torch.Tensor, out: str):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    shard = batch.chunk(WORLD)[rank]
    for permute in MODES:  # one spawn for both modes: starting processes is the slow part
        model = _peft_model(model_dir, permute)
        layers = model.base_model.model.model.layers
        for layer in layers:
            fully_shard(layer)  # one unit per decoder layer: its frozen weights and its deltas together
        fully_shard(model)
        o_proj = layers[0].self_attn.o_proj
        sharded = (o_proj.base_layer.weight, o_proj.s2ft_delta["default"])
        assert all(isinstance(p, DTensor) and p.to_local().shape[0] < p.shape[0] for p in sharded)
        assert not isinstance(o_proj.s2ft_indices["default"], DTensor)  # buffers stay whole

        losses = _train(model, lambda m: m(input_ids=shard, labels=shard).loss)
        for loss in losses:  # the global loss: the mean of the two shards' (equal-size) losses
            dist.all_reduce(loss)
        losses = [float(loss) / WORLD for loss in losses]

        # Every rank takes part in gathering the full state dict; only rank 0 receives it (on the CPU) and saves.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        if rank == 0:
            model.save_pretrained(f"{out}.{permute}.adapter", state_dict=state)
            torch.save(losses, f"{out}.{permute}.losses")

        # Loading the full state dict back (broadcast from rank 0) leaves the sharded model as it was.
        with torch.no_grad():
            before = model(input_ids=shard, labels=shard).loss
        model.reshard()  # the root unit keeps its parameters gathered after a forward; loading needs them sharded
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=shard, labels=shard).loss, before, atol=0, rtol=0)
        del model, state


@pytest.fixture(scope="module")
def fsdp_results(model_dirs, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fsdp2")
    batch = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    out = str(tmp_path / "run")
    spawn(_worker, str(tmp_path / "init"), (model_dirs["llama-gqa"], batch, out))
    return batch, out


@pytest.mark.parametrize("permute", MODES)
def test_fsdp2_matches_single_process_and_reloads(model_dirs, fsdp_results, permute):
    batch, out = fsdp_results
    model = _peft_model(model_dirs["llama-gqa"], permute)
    # FSDP2 averages the shards' gradients: the same as the mean of the per-shard losses here.
    losses = _train(model, lambda m: sum(m(input_ids=s, labels=s).loss for s in batch.chunk(WORLD)) / WORLD)
    torch.testing.assert_close(torch.load(f"{out}.{permute}.losses"), [float(x) for x in losses], **TOLERANCE)

    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dirs["llama-gqa"]), f"{out}.{permute}.adapter"
    )
    trained = {n: p for n, p in model.named_parameters() if "s2ft_delta" in n}
    loaded = {n: p for n, p in reloaded.named_parameters() if "s2ft_delta" in n}
    assert loaded.keys() == trained.keys() and len(trained) == 4  # o_proj and down_proj of both layers
    for name, param in trained.items():
        torch.testing.assert_close(loaded[name], param, **TOLERANCE)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch).logits, model(input_ids=batch).logits, **TOLERANCE)


@pytest.mark.slow
def test_fsdp2_example_trains_and_saves_in_bf16(tmp_path):
    """examples/fsdp2_train.py under torchrun, reduced: a tiny chat model, bf16 compute with fp32 deltas."""
    from tiny_chat import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "model")
    out = tmp_path / "adapter"
    root = Path(__file__).resolve().parents[1]
    args = ["--model", str(model_dir), "--max-length", "2048", "--batch-size", "2", "--max-steps", "2"]
    log = torchrun("examples/fsdp2_train.py", [*args, "--bf16", "--output-dir", str(out)], cwd=str(root))
    assert "step 2/2" in log and f"adapter saved to {out}" in log

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    deltas = {n: p for n, p in reloaded.named_parameters() if "s2ft_delta" in n}
    assert len(deltas) == 4 and all(p.dtype == torch.float32 and p.abs().max() > 0 for p in deltas.values())
