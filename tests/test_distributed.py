"""torch.distributed (DDP over gloo, 2 CPU processes): the adapter trains as on one process."""

import gc

import pytest
import torch
from gloo_workers import WORLD, spawn
from peft import get_peft_model
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

from peft_s2ft import S2FTConfig

MODES = (False, True)  # permute


def _peft_model(model_dir: str, permute: bool):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return get_peft_model(model, S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=2, permute=permute))


def _step(model, module, batch):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    module(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank: int, model_dir: str, batch: torch.Tensor, out: str):
    for permute in MODES:  # one spawn for both modes: starting processes is the slow part
        torch.manual_seed(0)
        model = _peft_model(model_dir, permute)
        ddp = DistributedDataParallel(model)
        shard = batch.chunk(WORLD)[rank]
        torch.save(_step(model, ddp, shard), f"{out}.{permute}.{rank}")
        del ddp, model  # free the DDP reducer while its process group is alive
        gc.collect()


@pytest.fixture(scope="module")
def ddp_results(model_dirs, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("ddp")
    batch = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    out = str(tmp_path / "params")
    spawn(_worker, str(tmp_path / "init"), (model_dirs["llama-gqa"], batch, out))
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
