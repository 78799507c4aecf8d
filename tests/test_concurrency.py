"""Several threads serving one model (a web demo, a threaded server) get exactly what one thread gets."""

from __future__ import annotations

import threading

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from peft_s2ft import S2FTConfig

THREADS, CALLS = 4, 25


@pytest.fixture
def one_intra_op_thread():
    # Bitwise comparisons need the same kernels on every call: no intra-op parallelism that could split work
    # differently while other threads compete for cores.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("permute", [False, True])
def test_threads_get_the_single_threaded_outputs_and_leave_the_weights_alone(one_intra_op_thread, permute):
    config = LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
    )
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_config(config),
        S2FTConfig(
            task_type="CAUSAL_LM", permute=permute, heads_per_layer=2, channels_per_layer=32, init_weights=False
        ),
    ).eval()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs = [torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(i)) for i in range(THREADS)]
    with torch.no_grad():
        expected = [model(ids).logits for ids in inputs]

    wrong, errors = [], []

    def serve(worker: int) -> None:
        try:
            for _ in range(CALLS):
                with torch.no_grad():
                    logits = model(inputs[worker]).logits
                if not torch.equal(logits, expected[worker]):
                    wrong.append(worker)
        except BaseException as error:  # reported below, so a crash in a thread fails the test
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(w,)) for w in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(wrong) == 0, f"{len(wrong)} of {THREADS * CALLS} outputs differ from the single-threaded ones"
    for name, param in model.named_parameters():
        assert torch.equal(param, weights[name]), name
