"""DeepSpeed ZeRO-2 and ZeRO-3 through transformers.Trainer (2 CPU processes over gloo): the adapter trains as a
single-process Trainer run on the same global batch, and `trainer.save_model` writes the trained adapter.

The plain ZeRO-3 case loads the model under `deepspeed.zero.Init` (TrainingArguments with the config exist before
`from_pretrained`, the usual order), so every base weight is partitioned when S2FT is attached; permute mode, which
reorders weights, is run on a model loaded before the TrainingArguments, which DeepSpeed partitions at train start.
"""

import importlib
import importlib.util
import json
import os

import pytest
import torch
from datasets import Dataset
from gloo_workers import WORLD, spawn
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from peft_s2ft import S2FTConfig

if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed (pip install 'peft-s2ft[dist]')", allow_module_level=True)

STEPS = 3
PER_DEVICE = 2
MAX_NORM = 0.05  # below the gradients' norm (about 0.4 here): clipping acts, so ZeRO's global norm must be right
# name: (stage, permute, load the model before the TrainingArguments exist, so without zero.Init)
CASES = {
    "zero2": (2, False, False),
    "zero2-permute": (2, True, False),
    "zero3": (3, False, False),
    "zero3-permute-loaded-first": (3, True, True),  # what the refusal below recommends for permute=True
}
# Measured on the 2-core CPU machine (torch 2.13, deepspeed 0.19.8), all cases: logged losses (about 4.16) at most
# 4.8e-7 apart (one float32 step), deltas (about 0.03) at most 6.5e-8, reloaded logits at most 8.9e-8. The tolerance
# leaves a margin of over 20x for other kernels and reduction orders.
TOLERANCE = dict(atol=1e-6, rtol=1e-5)


def _dataset() -> Dataset:
    """STEPS global batches of equal-length rows, read in order: both runs see the same rows at each step."""
    ids = torch.randint(0, 64, (STEPS * WORLD * PER_DEVICE, 10), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _args(output_dir: str, per_device: int, deepspeed: dict | None = None) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=STEPS,
        per_device_train_batch_size=per_device,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=MAX_NORM,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
        use_cpu=deepspeed is None,
        deepspeed=deepspeed,
        # The distributed state the worker configured (see _configure_accelerate).
        accelerator_config={"use_configured_state": True} if deepspeed else None,
    )


def _zero_config(stage: int) -> dict:
    # stage3_gather_16bit_weights_on_model_save stays at DeepSpeed's default (false): Trainer.save_model gathers a
    # PEFT model's trainable parameters itself.
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": False},
    }


def _s2ft(**kwargs) -> S2FTConfig:
    return S2FTConfig(task_type="CAUSAL_LM", heads_per_layer=2, **kwargs)


def _losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _configure_accelerate() -> None:
    """Make accelerate see the 2 processes.

    On a machine without GPUs, TrainingArguments(deepspeed=...) lets accelerate 1.15 pick no backend, so it reports
    one process: every rank is then fed the same batches while DeepSpeed averages gradients over both, a run that
    looks right and trains on half the data. Naming the gloo backend first gives the real world size; on GPUs
    (nccl) this is not needed.
    """
    from accelerate.state import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        state = PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    assert state.num_processes == WORLD


def _refusals(model_dir: str) -> dict[str, str]:
    """What get_peft_model says about options that read the values of ZeRO-3 partitioned weights."""
    messages = {}
    for name, config in {"permute": _s2ft(permute=True), "weight_large": _s2ft(selection="weight_large")}.items():
        try:
            get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
        except ValueError as error:
            messages[name] = str(error)
    return messages


def _worker(rank: int, model_dir: str, out: str):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce (C++, 98 s on this 2-core machine) that it only
    # uses for inference all-reduces with LOCAL_SIZE set; this test's collectives all go through gloo. (The module is
    # looked up by name: the attribute `deepspeed.comm.torch` is the torch package.)
    backend = importlib.import_module("deepspeed.comm.torch")
    if hasattr(backend, "build_shm_op"):
        backend.build_shm_op = lambda: None
    _configure_accelerate()
    for name, (stage, permute, load_first) in CASES.items():
        if load_first:
            model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), _s2ft(permute=permute))
        args = _args(f"{out}/{name}", PER_DEVICE, _zero_config(stage))  # before from_pretrained: zero.Init at stage 3
        if not load_first:
            base = AutoModelForCausalLM.from_pretrained(model_dir)
            partitioned = base.model.layers[0].mlp.down_proj.weight.numel() == 0
            assert partitioned == (stage == 3), "ZeRO-3 should partition the weights at load time"
            if stage == 3:
                refusals = _refusals(model_dir)  # on every rank: loading under zero.Init is collective
                if rank == 0:
                    with open(f"{out}/refusals.json", "w") as file:
                        json.dump(refusals, file)
            model = get_peft_model(base, _s2ft(permute=permute))
        trainer = Trainer(model=model, args=args, train_dataset=_dataset())
        trainer.train()
        trainer.save_model(f"{out}/{name}/adapter")  # every rank takes part in gathering; rank 0 writes
        if rank == 0:
            torch.save(_losses(trainer), f"{out}/{name}/losses.pt")
        del trainer, model, args
        # Start the next case as a new process would: one Accelerator per process may hold a DeepSpeed plugin
        # (forget it, keeping the distributed state configured above), and no ZeRO-3 config steers from_pretrained.
        AcceleratorState._reset_state(reset_partial_state=False)
        unset_hf_deepspeed_config()


@pytest.fixture(scope="module")
def deepspeed_results(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    spawn(_worker, str(out / "init"), (model_dirs["llama-gqa"], str(out)), extra_env={"DS_ACCELERATOR": "cpu"})
    return out


@pytest.mark.parametrize("case", CASES)
def test_zero_matches_single_process_and_saves(model_dirs, deepspeed_results, tmp_path, case):
    _, permute, _ = CASES[case]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dirs["llama-gqa"]), _s2ft(permute=permute))
    trainer = Trainer(model=model, args=_args(str(tmp_path), WORLD * PER_DEVICE), train_dataset=_dataset())
    trainer.train()
    torch.testing.assert_close(torch.load(deepspeed_results / case / "losses.pt"), _losses(trainer), **TOLERANCE)

    base = AutoModelForCausalLM.from_pretrained(model_dirs["llama-gqa"])
    reloaded = PeftModel.from_pretrained(base, deepspeed_results / case / "adapter")
    trained = {n: p for n, p in model.named_parameters() if "s2ft_delta" in n}
    loaded = {n: p for n, p in reloaded.named_parameters() if "s2ft_delta" in n}
    assert loaded.keys() == trained.keys() and len(trained) == 4  # o_proj and down_proj of both layers
    for name, param in trained.items():
        torch.testing.assert_close(loaded[name], param, **TOLERANCE)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, **TOLERANCE)


def test_zero3_refuses_options_that_read_partitioned_weights(deepspeed_results):
    with open(deepspeed_results / "refusals.json") as file:
        refusals = json.load(file)
    assert refusals.keys() == {"permute", "weight_large"}
    for message in refusals.values():
        assert "DeepSpeed ZeRO-3 has partitioned them" in message
    assert "permute=False" in refusals["permute"] and "selection='random'" in refusals["weight_large"]
