"""torch.distributed (DDP over gloo, 2 CPU processes): the adapter trains as on one process."""

import gc
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import get_peft_model
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

from peft_s2ft import S2FTConfig

WORLD = 2
MODES = (False, True)  # permute
# Fail in a minute rather than wait gloo's default 30 minutes when the processes cannot connect.
CONNECT_TIMEOUT = timedelta(seconds=60)


def _loopback_interface() -> str | None:
    """Gloo connects through the address the hostname resolves to; on machines where that address is
    unreachable (containers, closed CI sandboxes) it blocks forever. Loopback always works for one host."""
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)


def _peft_model(model_dir: str, permute: bool):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return get_peft_model(model, S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=2, permute=permute))


def _step(model, module, batch):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    module(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank: int, model_dir: str, init_file: str, batch: torch.Tensor, out: str):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=CONNECT_TIMEOUT
    )
    try:
        for permute in MODES:  # one spawn for both modes: starting processes is the slow part
            torch.manual_seed(0)
            model = _peft_model(model_dir, permute)
            ddp = DistributedDataParallel(model)
            shard = batch.chunk(WORLD)[rank]
            torch.save(_step(model, ddp, shard), f"{out}.{permute}.{rank}")
            del ddp, model  # free the DDP reducer while its process group is alive
            gc.collect()
        dist.barrier()  # all collectives finished on both ranks
    finally:
        dist.destroy_process_group()
    # Seen once in a CI-like run: freeing gloo objects at interpreter exit deadlocked (a gloo thread waited for
    # the GIL held by the destructor joining it). The results are on disk, so skip interpreter teardown.
    os._exit(0)


@pytest.fixture(scope="module")
def ddp_results(model_dirs, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    batch = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    out = str(tmp_path / "params")
    loopback = _loopback_interface()
    with pytest.MonkeyPatch.context() as env:  # the spawned workers inherit these
        env.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
        if loopback is not None and "GLOO_SOCKET_IFNAME" not in os.environ:
            env.setenv("GLOO_SOCKET_IFNAME", loopback)
        mp.spawn(_worker, args=(model_dirs["llama-gqa"], str(tmp_path / "init"), batch, out), nprocs=WORLD)
    return batch, {m: [torch.load(f"{out}.{m}.{r}") for r in range(WORLD)] for m in MODES}


@pytest.mark.parametrize("permute", MODES)
def test_ddp_matches_single_process(model_dirs, ddp_results, permute):
    batch, results = ddp_results
    ranks = results[permute]

    torch.manual_seed(0)
    model = _peft_model(model_dirs["llama-gqa"], permute)
    # DDP averages the per-shard gradients: the same as the mean of the per-shard losses here.
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = sum(model(input_ids=s, labels=s).loss for s in batch.chunk(WORLD)) / WORLD
    loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            for rank in ranks:
                torch.testing.assert_close(rank[name], param.detach(), atol=1e-6, rtol=1e-5)
