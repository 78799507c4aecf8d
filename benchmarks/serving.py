"""Serving S2FT adapters against a parameter-matched PEFT LoRA, in one process (issue #10).

Per model, both methods get the same adapters (random, non-zero deltas; every S2FT adapter its own selection), and
every measurement is timed with the methods interleaved round-robin, medians over repeats. What is timed is checked
first against a reference computed another way (see docs/serving.md):

- switch: a merged model switches adapter (`unmerge_adapter(); set_adapter(next); merge_adapter()`), and an
  unmerged one hot-swaps its "default" adapter from a folder (PEFT's `hotswap_adapter` for LoRA,
  `peft_s2ft.hotswap.hotswap_adapter` for S2FT);
- mixed: prefill (and a few decode steps) of a batch whose rows use k different adapters (`adapter_names`);
- unmerged: prefill and decode with one active, unmerged adapter against the base model without adapters;
- fusion: `add_weighted_adapter([a, b], [1, 1], "fused")` ("linear" for S2FT, "cat" for LoRA) and how far
  the fused adapter's logits are from both adapters active together;
- export: an S2FT adapter written as an exact LoRA for vLLM (`peft_s2ft.export_lora(..., pad_to_rank="vllm")`),
  its rank and file size, loaded back with PEFT and checked.

A measurement of a feature S2FT does not have yet is recorded as `{"skipped": reason}`; a check that fails is
recorded as `{"failed": reason}`, and the script then exits with status 1 after writing the records.

    python benchmarks/serving.py --quick                   # tiny random Llama, seconds
    python benchmarks/serving.py                           # every model, records in docs/results/serving-*.json
    python benchmarks/serving.py --from-records --report docs/serving.md --plot docs/serving.png
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib.util
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script, the repository root is not on the path; as a module it already is.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from benchmarks.efficiency import code_version, machine
from benchmarks.methods import copy_for, lora_targets, matched_lora_rank, method_lora_config
from benchmarks.models import DTYPES, EMBEDDED, Shape, load_base_model


def _llama(hidden: int, ffn: int, heads: int, kv_heads: int, head_dim: int, vocab: int) -> Shape:
    return Shape(
        "llama",
        dict(
            hidden_size=hidden,
            intermediate_size=ffn,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            num_hidden_layers=2,
            vocab_size=vocab,
            tie_word_embeddings=True,
            max_position_embeddings=4096,
        ),
    )


# Random-init Llamas with the layer geometry of SmolLM2-135M (576), Llama-3.2-1B (2048) and Llama-3-8B (4096), two
# layers each so that the widest fits this machine. The vocabulary is cut so that the LM head's share of a decode
# step's weights stays about what it is in the real model (21%, 20%, 7%); prefill computes logits for the last
# token only (`logits_to_keep=1`), as a server does.
SERVING_SHAPES: dict[str, Shape] = {
    "llama-576-shape": _llama(576, 1536, 9, 3, 64, 4096),
    "llama-2048-shape": _llama(2048, 8192, 32, 8, 64, 16384),
    "llama-4096-shape": _llama(4096, 14336, 32, 8, 128, 8192),
}
MEASUREMENTS = ("switch", "mixed", "unmerged", "fusion", "export")
METHODS = ("s2ft", "lora")
QUICK = {"model": "tiny", "batch": 4, "seq_len": 8, "decode_tokens": 2, "adapters": "2,4", "repeats": 2}
DEFAULTS = {
    "model": ",".join((EMBEDDED, *SERVING_SHAPES)),
    "batch": 32,
    "seq_len": 32,
    "decode_tokens": 8,
    "adapters": "2,8,32",
    "repeats": 5,
}
# Trained adapters are small next to the weights: the libraries' random inits (S2FT's N(0, 0.1) delta, LoRA's
# kaiming-uniform B) are scaled by this.
DELTA_SCALE = 0.1
# A timed output must match its reference to atol x max(1, largest reference logit), and the adapters must move the
# logits by at least EFFECT x that tolerance (else the check could not tell the adapters apart).
# Atol per dtype (half precision rounds each layer's output; untested here, no GPU); the run's dtype picks it.
ATOLS, EFFECT = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}, 100.0
_atol = [ATOLS["fp32"]]
SWITCH_TARGET, MIXED_TARGET, SWITCH_WIDTH = 10.0, 0.8, 2048
# The two adapters that switch, fuse and serve alone ("a" is not a name PEFT likes: it is part of "lora_").
A, B = "task0", "task1"
MARKERS = ("<!-- serving-tables:start -->", "<!-- serving-tables:end -->")
_NOT_YET = re.compile(r"not (support|implement)|\byet\b", re.IGNORECASE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"Comma list of {EMBEDDED}, {', '.join(SERVING_SHAPES)}, tiny, folders.")
    parser.add_argument("--batch", type=int, help="Rows per batch; at least the largest --adapters (default 32).")
    parser.add_argument("--seq-len", type=int, help="Prompt tokens per row (default 32).")
    parser.add_argument("--decode-tokens", type=int, help="Timed decode steps after a prefill (default 8).")
    parser.add_argument("--adapters", help="Comma list of adapter counts per mixed batch (default 2,8,32).")
    parser.add_argument("--repeats", type=int, help="Timed repeats per measurement and method (default 5).")
    parser.add_argument("--measurements", default=",".join(MEASUREMENTS), help="Comma list (default: all).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output-dir", help="Write serving-<model>[-<tag>].json here (default docs/results; --quick: nowhere)."
    )
    parser.add_argument("--tag", default="", help="Suffix of the record files (e.g. run2).")
    parser.add_argument("--report", help="Rewrite the tables between the serving-tables markers of this Markdown file.")
    parser.add_argument("--plot", help="Write a PNG of the figures (needs matplotlib).")
    parser.add_argument(
        "--from-records", action="store_true", help="Measure nothing: --report / --plot from --output-dir's records."
    )
    parser.add_argument("--quick", action="store_true", help=f"A short run: {QUICK}, unless given.")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.output_dir is None and not args.quick:
        args.output_dir = str(Path(__file__).resolve().parent.parent / "docs" / "results")
    args.adapter_counts = sorted({int(k) for k in _split(args.adapters)})
    unknown = set(_split(args.measurements)) - set(MEASUREMENTS)
    if unknown:
        parser.error(f"unknown measurements {sorted(unknown)}; choose from {', '.join(MEASUREMENTS)}.")
    if min(args.adapter_counts) < 2 or args.batch < max(args.adapter_counts):
        parser.error(f"--adapters must be >= 2 and --batch ({args.batch}) at least the largest of them.")
    return args


def _split(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


# --------------------------------------------------------------------------------------------------
# models and adapters
def load_base(name: str, dtype: torch.dtype, seed: int) -> nn.Module:
    """The frozen base model `name` in eval mode: a serving shape, a benchmarks/models.py shape or a checkpoint."""
    if name in SERVING_SHAPES:
        import transformers

        shape = SERVING_SHAPES[name]
        config = transformers.AutoConfig.for_model(shape.model_type, **shape.config)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
        model.config.use_cache = False
    else:
        model = load_base_model(name, dtype, seed=seed)
    return model.requires_grad_(False).eval()


def shape_of(model: nn.Module) -> dict[str, Any]:
    config = model.config
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    found = {f: getattr(config, f, None) for f in fields}
    found["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    found["vocab_size"] = config.vocab_size
    found["parameters"] = sum(p.numel() for p in model.parameters())
    return found


def adapter_names(count: int) -> list[str]:
    """The names of `count` adapters: A and B (the two every measurement uses) first."""
    return [f"task{i}" for i in range(count)]


@dataclass
class Served:
    """One method's model with every adapter loaded (unmerged, eval mode); `facts` go into the records."""

    method: str
    model: nn.Module
    names: list[str]
    facts: dict[str, Any] = field(default_factory=dict)


def _scale_deltas(model: nn.Module, pattern: str) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if pattern in name:
                param.mul_(DELTA_SCALE)


def _adapted_modules(model: nn.Module, attribute: str, name: str = A) -> list[nn.Module]:
    return [m for m in model.modules() if name in getattr(m, attribute, {})]


def build_s2ft(base: nn.Module, names: list[str], seed: int) -> Served:
    """The default S2FT (~1% of the parameters) with `init_weights=False`, one selection seed per adapter."""
    import peft

    import peft_s2ft

    def config(i: int):
        return peft_s2ft.S2FTConfig(task_type="CAUSAL_LM", init_weights=False, seed=seed + i)

    model = peft.get_peft_model(copy_for("s2ft", base), config(0), adapter_name=names[0])
    for i, name in enumerate(names[1:], 1):
        model.add_adapter(name, config(i))
    _scale_deltas(model, "s2ft_delta")
    model.set_adapter(names[0], inference_mode=True)
    layers = _adapted_modules(model, "s2ft_delta")
    differ = any(not torch.equal(m.selected(A), m.selected(B)) for m in layers)
    adapted = {id(m) for m in layers}
    facts = {
        "trainable_per_adapter": sum(m.s2ft_delta[A].numel() for m in layers),
        "adapted_modules": len(layers),
        "adapted_module_names": sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if id(m) in adapted}),
        # |S| of the widest layer: the rank of the exact LoRA an export would write.
        "max_selected": max(int(m.selected(A).numel()) for m in layers),
        "selections_differ": differ,
    }
    return Served("s2ft", model.eval(), names, facts)


def build_lora(base: nn.Module, names: list[str], budget: int) -> Served:
    """The paper's LoRA (q, k, v, up, down; alpha = 2r) at the rank matching `budget`, on its own copy of the
    weights (merging writes them), B initialized randomly (`init_lora_weights=False`)."""
    import peft

    rank = matched_lora_rank(base, "lora", budget)
    config = dataclasses.replace(method_lora_config(rank, lora_targets(base, "lora")), init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, copy.deepcopy(config))
    _scale_deltas(model, "lora_B")
    model.set_adapter(names[0], inference_mode=True)
    layers = _adapted_modules(model, "lora_A")
    trainable = sum(m.lora_A[A].weight.numel() + m.lora_B[A].weight.numel() for m in layers)
    facts = {"rank": rank, "trainable_per_adapter": trainable, "adapted_modules": len(layers)}
    return Served("lora", model.eval(), names, facts)


def activate(served: Served, names: str | list[str]) -> None:
    """Make `names` the active adapter(s); a list activates several together (their deltas add)."""
    if isinstance(names, str):
        served.model.set_adapter(names, inference_mode=True)
    else:
        served.model.base_model.set_adapter(list(names), inference_mode=True)


# --------------------------------------------------------------------------------------------------
# timing and checking
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> Callable[[], float]:
    """`fn` as a step that returns its own wall time."""

    def step() -> float:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    return step


def interleave(steps: dict[str, Callable[[], float]], repeats: int, label: str) -> dict[str, list[float]]:
    """One untimed warm-up call of each step, then `repeats` rounds, the order rotated each round."""
    names = list(steps)
    for name in names:
        steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for k in range(len(names)):
            name = names[(k + repeat) % len(names)]
            times[name].append(steps[name]())
    summary = ", ".join(f"{name} {statistics.median(ts) * 1e3:.2f} ms" for name, ts in times.items())
    print(f"  {label}: {summary}", flush=True)
    return times


def summary(times: list[float], work: float | None = None) -> dict[str, Any]:
    """Median and all times; with `work` (tokens), also tokens per second at the median."""
    median = statistics.median(times)
    found: dict[str, Any] = {"median_s": median, "times_s": times}
    if work is not None:
        found["tokens_per_s"] = work / median
    return found


class CheckFailed(AssertionError):
    """A timed output does not match its reference."""


class NotYet(Exception):
    """A feature the library does not have yet."""


def tolerance_for(reference: torch.Tensor) -> float:
    """How far a checked output may be from `reference`: the dtype's atol, relative to logits above 1."""
    return _atol[0] * max(1.0, reference.float().abs().max().item())


def compare(output: torch.Tensor, reference: torch.Tensor, what: str) -> dict[str, float]:
    """Max abs difference of two logit tensors, raising `CheckFailed` above the tolerance."""
    diff = (output.float() - reference.float()).abs().max().item()
    tolerance = tolerance_for(reference)
    if not diff <= tolerance:
        raise CheckFailed(f"{what}: max abs diff {diff:.3g} > tolerance {tolerance:.3g}")
    return {"max_abs_diff": diff, "tolerance": tolerance}


def require_effect(output: torch.Tensor, other: torch.Tensor, tolerance: float, what: str) -> float:
    effect = (output.float() - other.float()).abs().max().item()
    if not effect >= EFFECT * tolerance:
        raise CheckFailed(f"{what}: the adapters move the logits by only {effect:.3g}; the check cannot see them")
    return effect


@contextmanager
def outcome(section: dict[str, Any], key: str) -> Iterator[dict[str, Any]]:
    """Fill `section[key]`; a missing feature becomes {"skipped": why}, a failure {"failed": why}."""
    entry: dict[str, Any] = {}
    section[key] = entry
    try:
        yield entry
    except NotYet as error:
        section[key] = {"skipped": str(error)}
    except (ValueError, NotImplementedError) as error:
        if not _NOT_YET.search(str(error)):
            section[key] = {"failed": f"{type(error).__name__}: {error}"}
        else:
            section[key] = {"skipped": f"{type(error).__name__}: {error}"}
    except (CheckFailed, RuntimeError, TypeError, KeyError, AttributeError) as error:
        section[key] = {"failed": f"{type(error).__name__}: {error}"}
    if "skipped" in section[key] or "failed" in section[key]:
        print(f"  {key}: {section[key]}", flush=True)


def logits(model: nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, **kwargs).logits.float()


def per_row_reference(
    served: Served, ids: torch.Tensor, rows: list[str], run: Callable[[nn.Module, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """`run(model, ids)` for each row with its own adapter active alone (the rows of one adapter in one batch)."""
    out: torch.Tensor | None = None
    for name in dict.fromkeys(rows):
        index = torch.tensor([i for i, n in enumerate(rows) if n == name], device=ids.device)
        activate(served, name)
        part = run(served.model, ids[index])
        if out is None:
            out = torch.empty((len(rows), *part.shape[1:]), dtype=part.dtype, device=part.device)
        out[index] = part
    activate(served, A)
    return out


def decode(
    model: nn.Module, ids: torch.Tensor, steps: int, device: torch.device, **kwargs
) -> tuple[float, torch.Tensor]:
    """Prefill `ids` (untimed), then `steps` greedy decode steps with the KV cache: their time, the last logits."""
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=past, use_cache=True, logits_to_keep=1, **kwargs)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        return time.perf_counter() - start, out.logits.float()


def decode_steps(model: nn.Module, ids: torch.Tensor, steps: int, device: torch.device, **kwargs) -> float:
    return decode(model, ids, steps, device, **kwargs)[0]


def prefill(model: nn.Module, ids: torch.Tensor, **kwargs) -> None:
    with torch.inference_mode():
        model(input_ids=ids, logits_to_keep=1, **kwargs)


# --------------------------------------------------------------------------------------------------
# measurements
@dataclass
class Bench:
    """What one model's measurements share."""

    base: nn.Module
    served: dict[str, Served]
    ids: torch.Tensor
    args: argparse.Namespace
    device: torch.device
    folders: Path  # adapters A and B of each method, saved: <folders>/<method>/<name>

    @property
    def check_ids(self) -> torch.Tensor:
        return self.ids[: min(2, len(self.ids))]


def save_adapters(bench: Bench) -> None:
    for method, served in bench.served.items():
        for name in (A, B):
            target = bench.folders / method / name
            served.model.save_pretrained(str(target), selected_adapters=[name])
            nested = target / name  # PEFT saves a non-default adapter into a subfolder named after it
            (target / "path").write_text(str(nested if nested.is_dir() else target))


def _folder(bench: Bench, method: str, name: str) -> str:
    return (bench.folders / method / name / "path").read_text()


def _hotswap_function(method: str) -> Callable[..., None]:
    if method == "lora":
        from peft.utils.hotswap import hotswap_adapter

        return hotswap_adapter
    if importlib.util.find_spec("peft_s2ft.hotswap") is None:
        raise NotYet("peft_s2ft.hotswap does not exist yet")
    from peft_s2ft.hotswap import hotswap_adapter

    return hotswap_adapter


def _weights_of(served: Served) -> dict[str, torch.Tensor]:
    """Clones of the base weights of the adapted layers (what merging writes)."""
    found = {}
    for name, module in served.model.named_modules():
        if A in getattr(module, "s2ft_delta", {}) or A in getattr(module, "lora_A", {}):
            found[name] = module.get_base_layer().weight.detach().clone()
    return found


def _drift(served: Served, before: dict[str, torch.Tensor]) -> dict[str, Any]:
    modules = dict(served.model.named_modules())
    now = {name: modules[name].get_base_layer().weight.detach() for name in before}
    drift = max((now[n].float() - w.float()).abs().max().item() for n, w in before.items())
    return {"restored_bit_exact": all(torch.equal(now[n], w) for n, w in before.items()), "max_weight_drift": drift}


def _hotswap_step(model: nn.Module, hotswap: Callable[..., None], bench: Bench, method: str) -> Callable[[], float]:
    """A step that hot-swaps the other of A and B into `model`'s "default" adapter (B first)."""
    state = {"next": B}

    def swap() -> None:
        with torch.no_grad():
            hotswap(model, _folder(bench, method, state["next"]), adapter_name="default")
        state["next"] = B if state["next"] == A else A

    return timed(swap, bench.device)


def _other(served: Served) -> str:
    """The one of A and B that is not active: every switch step switches, whichever step ran before."""
    return B if served.model.active_adapter == A else A


def measure_switch(bench: Bench) -> dict[str, Any]:
    """Switching from adapter A to B and back, each switch checked once against B's unmerged logits:

    - merged: `unmerge_adapter(); set_adapter(next); merge_adapter()` on the model holding every adapter;
    - merged_set_adapter (S2FT only): `set_adapter(next)` alone on that merged model, which S2FT switches merged;
    - hotswap: the file of the next adapter into the "default" adapter of a model loaded with A's (unmerged);
    - hotswap_merged (S2FT only; PEFT's LoRA hotswap refuses merged adapters): the same on a merged model.
    """
    import peft

    section: dict[str, Any] = {"merged": {}, "merged_set_adapter": {}, "hotswap": {}, "hotswap_merged": {}}
    references = {}
    steps: dict[str, Callable[[], float]] = {}
    keys: dict[str, tuple[str, str]] = {}
    for method, served in bench.served.items():
        activate(served, B)
        references[method] = logits(served.model, bench.check_ids)
        activate(served, A)
    hotswapped: dict[str, nn.Module] = {}
    kinds = [(m, "hotswap") for m in bench.served] + [("s2ft", "hotswap_merged")]
    for method, kind in kinds:
        with outcome(section[kind], method) as entry:
            hotswap = _hotswap_function(method)
            merged = kind == "hotswap_merged"
            # Merging writes the base weights: that model gets its own copy of them.
            weights = copy.deepcopy(bench.base) if merged else copy_for("s2ft", bench.base)
            model = peft.PeftModel.from_pretrained(weights, _folder(bench, method, A)).eval()
            first = logits(model, bench.check_ids)
            if method == "s2ft":
                # Selections of the same budget can differ by a unit per layer; a swap never grows a tensor, so a
                # server makes room for every adapter it will swap in once, after loading (before merging).
                from peft_s2ft.hotswap import prepare_model_for_compiled_hotswap

                start = time.perf_counter()
                folders = [_folder(bench, method, name) for name in (A, B)]
                prepare_model_for_compiled_hotswap(model, adapters=folders, adapter_name="default")
                entry["prepare_s"] = time.perf_counter() - start
            with torch.no_grad():
                if merged:
                    model.merge_adapter()
                hotswap(model, _folder(bench, method, B), adapter_name="default")
            entry["check"] = compare(logits(model, bench.check_ids), references[method], f"{method} {kind} a -> b")
            require_effect(first, references[method], entry["check"]["tolerance"], f"{method} {kind}")
            with torch.no_grad():
                hotswap(model, _folder(bench, method, A), adapter_name="default")  # the step's first swap is to B
            steps[f"{method} {kind}"] = _hotswap_step(model, hotswap, bench, method)
            keys[f"{method} {kind}"] = (kind, method)
            hotswapped[kind] = model
    snapshots = {}
    for method, served in bench.served.items():
        with outcome(section["merged"], method) as entry:
            snapshots[method] = _weights_of(served)
            model = served.model
            activate(served, A)
            with torch.no_grad():
                model.merge_adapter()
                model.unmerge_adapter()
                activate(served, B)
                model.merge_adapter()
            entry["check"] = compare(logits(model, bench.check_ids), references[method], f"{method} merged a -> b")
            with torch.no_grad():
                model.unmerge_adapter()
                activate(served, A)
                model.merge_adapter()

            def switch(served=served) -> None:
                with torch.no_grad():
                    served.model.unmerge_adapter()
                    activate(served, _other(served))
                    served.model.merge_adapter()

            steps[f"{method} merged"] = timed(switch, bench.device)
            keys[f"{method} merged"] = ("merged", method)
    # S2FT's set_adapter on a merged model switches what is merged (copy out, copy in) in one call; LoRA's
    # unmerges and leaves the model unmerged.
    with outcome(section["merged_set_adapter"], "s2ft") as entry:
        served = bench.served["s2ft"]
        if "check" not in section["merged"]["s2ft"]:
            raise NotYet("the merged switch did not run")
        with torch.no_grad():
            activate(served, B)
        entry["still_merged"] = all(m.merged for m in _adapted_modules(served.model, "s2ft_delta", B))
        if not entry["still_merged"]:
            raise NotYet("S2FT's set_adapter does not switch a merged model yet (it left it unmerged)")
        entry["check"] = compare(logits(served.model, bench.check_ids), references["s2ft"], "s2ft set_adapter a -> b")
        with torch.no_grad():
            activate(served, A)

        def set_merged(served=served) -> None:
            with torch.no_grad():
                activate(served, _other(served))

        steps["s2ft merged set_adapter"] = timed(set_merged, bench.device)
        keys["s2ft merged set_adapter"] = ("merged_set_adapter", "s2ft")
    times = interleave(steps, bench.args.repeats, "switch") if steps else {}
    for label, (kind, method) in keys.items():
        entry = section[kind][method]
        entry.update(summary(times[label]))
        entry["per_module_s"] = entry["median_s"] / bench.served[method].facts["adapted_modules"]
    for method, served in bench.served.items():
        if method in snapshots and "check" in section["merged"][method]:
            with torch.no_grad():
                served.model.unmerge_adapter()
            activate(served, A)
            section["merged"][method].update(_drift(served, snapshots[method]))
    if "hotswap_merged" in hotswapped:
        model = hotswapped["hotswap_merged"]
        with torch.no_grad():
            model.unmerge_adapter()
        entry = section["hotswap_merged"]["s2ft"]
        entry["restored_bit_exact"] = all(
            torch.equal(module.get_base_layer().weight, bench.base.get_submodule(path).weight)
            for path, module in model.base_model.model.named_modules()
            if "default" in getattr(module, "s2ft_delta", {})
        )
    section["merged_speedup"] = _ratio(section["merged"], "lora", "s2ft")
    section["hotswap_speedup"] = _ratio(section["hotswap"], "lora", "s2ft")
    section["s2ft_merged_vs_lora_hotswap"] = _cross(section["hotswap"].get("lora"), section["merged"].get("s2ft"))
    return section


def _ratio(entries: dict[str, Any], numerator: str, denominator: str) -> float | None:
    return _cross(entries.get(numerator), entries.get(denominator))


def _cross(top: dict | None, bottom: dict | None) -> float | None:
    if not top or not bottom or "median_s" not in top or "median_s" not in bottom:
        return None
    return top["median_s"] / bottom["median_s"]


def measure_mixed(bench: Bench, counts: list[int]) -> dict[str, Any]:
    """Per k: a batch whose rows use k adapters round-robin, prefill and decode, checked row by row first."""
    section: dict[str, Any] = {}
    rows_tokens = bench.ids.numel()
    decode_tokens = len(bench.ids) * bench.args.decode_tokens
    for k in counts:
        rows = [adapter_names(k)[i % k] for i in range(len(bench.ids))]
        entries: dict[str, Any] = {"adapters": k, "rows": len(rows)}
        steps: dict[str, Callable[[], float]] = {}
        for method, served in bench.served.items():
            with outcome(entries, method) as entry:
                activate(served, A)
                model = served.model
                out = logits(model, bench.ids, adapter_names=rows)
                reference = per_row_reference(served, bench.ids, rows, logits)
                entry["check"] = compare(out, reference, f"{method} mixed batch of {k} adapters")
                entry["check"]["adapter_effect"] = require_effect(
                    reference[1], logits(model, bench.ids[1:2])[0], entry["check"]["tolerance"], f"{method} mixed"
                )  # row 1 has adapter B; the same row with A, which is active
                if bench.args.decode_tokens:
                    out = decode(model, bench.ids, 1, bench.device, adapter_names=rows)[1]
                    reference = per_row_reference(
                        served, bench.ids, rows, lambda m, x: decode(m, x, 1, bench.device)[1]
                    )
                    entry["check_decode"] = compare(out, reference, f"{method} mixed decode step, {k} adapters")
                steps[f"{method} prefill"] = timed(
                    lambda m=model, rows=rows: prefill(m, bench.ids, adapter_names=rows), bench.device
                )
                if bench.args.decode_tokens:
                    steps[f"{method} decode"] = lambda m=model, rows=rows: decode_steps(
                        m, bench.ids, bench.args.decode_tokens, bench.device, adapter_names=rows
                    )
        if steps:
            # The base model on the same batch, without adapters: no method's mixed batch can be faster.
            steps["base prefill"] = timed(lambda: prefill(bench.base, bench.ids), bench.device)
            if bench.args.decode_tokens:
                steps["base decode"] = lambda: decode_steps(
                    bench.base, bench.ids, bench.args.decode_tokens, bench.device
                )
            entries["base"] = {}
        times = interleave(steps, bench.args.repeats, f"mixed k={k}") if steps else {}
        for name in ("base", *bench.served):
            for phase, work in (("prefill", rows_tokens), ("decode", decode_tokens)):
                if f"{name} {phase}" in times:
                    entries[name][phase] = summary(times[f"{name} {phase}"], work)
        for phase in ("prefill", "decode"):
            base = _get(entries, "base", phase, "median_s")
            for method in bench.served:
                mine = _get(entries, method, phase)
                if base and mine:
                    mine["overhead"] = mine["median_s"] / base - 1.0
            entries[f"{phase}_ratio"] = _phase_ratio(entries, phase)
            lora = _get(entries, "lora", phase, "median_s")
            # The lowest S2FT / LoRA any method can reach here: the base model's own time over LoRA's.
            entries[f"{phase}_floor"] = base / lora if base and lora else None
        section[str(k)] = entries
    return section


def _phase_ratio(entries: dict[str, Any], phase: str) -> float | None:
    s2ft, lora = entries.get("s2ft", {}).get(phase), entries.get("lora", {}).get(phase)
    return s2ft["median_s"] / lora["median_s"] if s2ft and lora else None


def measure_unmerged(bench: Bench) -> dict[str, Any]:
    """Prefill and decode with adapter A active (unmerged) against the base model without adapters."""
    section: dict[str, Any] = {}
    tokens, decode_tokens = bench.ids.numel(), len(bench.ids) * bench.args.decode_tokens
    models = {"base": bench.base}
    reference = logits(bench.base, bench.check_ids)
    for method, served in bench.served.items():
        with outcome(section, method) as entry:
            activate(served, A)
            tolerance = tolerance_for(reference)
            entry["adapter_effect"] = require_effect(
                logits(served.model, bench.check_ids), reference, tolerance, f"{method} unmerged"
            )
            with served.model.disable_adapter():
                entry["check_disabled"] = compare(
                    logits(served.model, bench.check_ids), reference, f"{method} with adapters disabled"
                )
            models[method] = served.model
    steps: dict[str, Callable[[], float]] = {}
    for name, model in models.items():
        steps[f"{name} prefill"] = timed(lambda m=model: prefill(m, bench.ids), bench.device)
        if bench.args.decode_tokens:
            steps[f"{name} decode"] = lambda m=model: decode_steps(m, bench.ids, bench.args.decode_tokens, bench.device)
    times = interleave(steps, bench.args.repeats, "unmerged")
    section.setdefault("base", {})
    for name in models:
        section[name]["prefill"] = summary(times[f"{name} prefill"], tokens)
        if f"{name} decode" in times:
            section[name]["decode"] = summary(times[f"{name} decode"], decode_tokens)
    for phase in ("prefill", "decode"):
        base = section["base"].get(phase)
        for method in bench.served:
            mine = section[method].get(phase) if isinstance(section[method], dict) else None
            if base and mine:
                mine["overhead"] = mine["median_s"] / base["median_s"] - 1.0
        s2ft, lora = section.get("s2ft", {}).get(phase), section.get("lora", {}).get(phase)
        if s2ft and lora and "overhead" in s2ft and "overhead" in lora:
            section[f"{phase}_s2ft_overhead_minus_lora"] = s2ft["overhead"] - lora["overhead"]
    return section


FUSION = {"s2ft": "linear", "lora": "cat"}


def measure_fusion(bench: Bench) -> dict[str, Any]:
    """`add_weighted_adapter([A, B], [1, 1], "fused")` timed (then deleted, untimed), and its logits against A and
    B active together."""
    section: dict[str, Any] = {}
    steps: dict[str, Callable[[], float]] = {}

    def fuse(served: Served) -> float:
        model = served.model
        with torch.no_grad():
            _sync(bench.device)
            start = time.perf_counter()
            model.add_weighted_adapter([A, B], [1.0, 1.0], "fused", combination_type=FUSION[served.method])
            _sync(bench.device)
            elapsed = time.perf_counter() - start
        model.delete_adapter("fused")
        activate(served, A)
        return elapsed

    for method, served in bench.served.items():
        with outcome(section, method) as entry:
            entry["combination_type"] = FUSION[method]
            activate(served, [A, B])
            both = logits(served.model, bench.check_ids)
            activate(served, A)
            only_a = logits(served.model, bench.check_ids)
            with torch.no_grad():
                served.model.add_weighted_adapter([A, B], [1.0, 1.0], "fused", combination_type=FUSION[method])
            activate(served, "fused")
            fused = logits(served.model, bench.check_ids)
            activate(served, A)
            served.model.delete_adapter("fused")
            tolerance = tolerance_for(both)
            entry["max_abs_diff"] = (fused - both).abs().max().item()
            entry["exact_within_tolerance"] = entry["max_abs_diff"] <= tolerance
            entry["b_effect"] = require_effect(both, only_a, tolerance, f"{method} fusion")
            steps[method] = lambda s=served: fuse(s)
    times = interleave(steps, bench.args.repeats, "fusion") if steps else {}
    for method, ts in times.items():
        section[method].update(summary(ts))
    section["s2ft_vs_lora"] = _ratio(section, "s2ft", "lora")
    return section


def _export_function() -> Callable[..., Any]:
    if importlib.util.find_spec("peft_s2ft.export") is None:
        raise NotYet("peft_s2ft.export (export_lora) does not exist yet")
    from peft_s2ft.export import export_lora

    return export_lora


def _weights_file(folder: Path) -> Path:
    return next(p for p in folder.rglob("adapter_model.*") if p.suffix in (".safetensors", ".bin"))


def measure_export(bench: Bench) -> dict[str, Any]:
    """S2FT adapter A exported as an exact LoRA (`export_lora(..., pad_to_rank="vllm")`, the folder vLLM loads with
    `--enable-lora --max-lora-rank R`), loaded back with PEFT and checked against A's logits."""
    import peft

    section: dict[str, Any] = {}
    with outcome(section, "s2ft") as entry:
        export_lora = _export_function()
        served = bench.served["s2ft"]
        activate(served, A)
        reference = logits(served.model, bench.check_ids)
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            try:
                config = export_lora(served.model, folder, adapter_name=A, pad_to_rank="vllm")
                entry["vllm_rank"] = config.r
            except ValueError as error:  # a module of rank above vLLM's largest: export per-module ranks instead
                if "vLLM" not in str(error):
                    raise
                entry["vllm_rank"], entry["vllm_refused"] = None, str(error)
                config = export_lora(served.model, folder, adapter_name=A)
            entry["export_s"] = time.perf_counter() - start
            entry["lora_rank"] = max([config.r, *(config.rank_pattern or {}).values()])
            entry["lora_file_bytes"] = _weights_file(Path(folder)).stat().st_size
            lora = peft.PeftModel.from_pretrained(copy_for("s2ft", bench.base), folder).eval()
            entry["check"] = compare(logits(lora, bench.check_ids), reference, "exported LoRA against S2FT")
        if (bench.folders / "s2ft" / A).exists():
            entry["s2ft_file_bytes"] = _weights_file(bench.folders / "s2ft" / A).stat().st_size
    return section


# --------------------------------------------------------------------------------------------------
# running
def run_model(name: str, args: argparse.Namespace, environment: dict[str, Any]) -> dict[str, Any]:
    """Every requested measurement on model `name`: one record."""
    device = torch.device(args.device)
    _atol[0] = ATOLS[args.dtype]
    measurements = _split(args.measurements)
    print(f"[{name}] building", flush=True)
    torch.manual_seed(args.seed)
    base = load_base(name, DTYPES[args.dtype], args.seed).to(device)
    count = max([2, *(args.adapter_counts if "mixed" in measurements else [])])
    names = adapter_names(count)
    start = time.perf_counter()
    s2ft = build_s2ft(base, names, args.seed)
    lora = build_lora(base, names, s2ft.facts["trainable_per_adapter"])
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq_len), generator=generator).to(device)
    record: dict[str, Any] = {
        "model": name,
        "tag": args.tag,
        "shape": shape_of(base),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "decode_tokens": args.decode_tokens,
        "adapters_loaded": count,
        **environment,
        "methods": {"s2ft": s2ft.facts, "lora": lora.facts},
        "build_s": time.perf_counter() - start,
    }
    print(f"[{name}] {record['shape']}; s2ft {s2ft.facts['trainable_per_adapter']:,} per adapter, "
          f"lora r={lora.facts['rank']} {lora.facts['trainable_per_adapter']:,}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as folders:
        bench = Bench(base, {"s2ft": s2ft, "lora": lora}, ids, args, device, Path(folders))
        if {"switch", "export"} & set(measurements):
            save_adapters(bench)
        if "switch" in measurements:
            record["switch"] = measure_switch(bench)
        if "mixed" in measurements:
            record["mixed"] = measure_mixed(bench, args.adapter_counts)
        if "unmerged" in measurements:
            record["unmerged"] = measure_unmerged(bench)
        if "fusion" in measurements:
            record["fusion"] = measure_fusion(bench)
        if "export" in measurements:
            record["export"] = measure_export(bench)
    record["targets"] = targets(record)
    del bench, s2ft, lora, base
    gc.collect()
    return record


def targets(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for what this record measured: met True/False, or None where a value is missing (a
    skipped feature) or the target does not apply (the switch target is for hidden >= SWITCH_WIDTH)."""

    def target(text: str, value: float | None, met: Callable[[float], bool], applies: bool = True) -> dict[str, Any]:
        return {"target": text, "value": value, "met": None if value is None or not applies else met(value)}

    found = []
    if "switch" in record:
        found.append(target(
            f"S2FT merged switch >= {SWITCH_TARGET:g}x faster than LoRA's (hidden >= {SWITCH_WIDTH})",
            record["switch"].get("merged_speedup"),
            lambda v: v >= SWITCH_TARGET,
            record["shape"]["hidden_size"] >= SWITCH_WIDTH,
        ))  # fmt: skip
    for k, entries in record.get("mixed", {}).items():
        found.append(target(
            f"mixed batch of {k} adapters: S2FT prefill <= {MIXED_TARGET:g} x LoRA's",
            entries.get("prefill_ratio"),
            lambda v: v <= MIXED_TARGET,
        ))  # fmt: skip
        found[-1]["floor"] = entries.get("prefill_floor")  # base / LoRA: no method can go below it
    if "unmerged" in record:
        for phase in ("prefill", "decode"):
            found.append(target(
                f"unmerged {phase}: S2FT's overhead over the base <= LoRA's (S2FT's minus LoRA's)",
                record["unmerged"].get(f"{phase}_s2ft_overhead_minus_lora"),
                lambda v: v <= 0.0,
            ))  # fmt: skip
    return found


def library_changes() -> list[str]:
    """`git status --porcelain` of peft_s2ft/: which library files differ from the commit the record names."""
    repo = Path(__file__).resolve().parents[1]
    try:
        run = subprocess.run(
            ["git", "status", "--porcelain", "--", "peft_s2ft"], cwd=repo, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in run.stdout.splitlines() if line.strip()]


def record_path(output_dir: str | Path, model: str, tag: str = "") -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).name if Path(model).exists() else model)
    return Path(output_dir) / f"serving-{safe}{'-' + tag if tag else ''}.json"


def load_records(output_dir: str | Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(Path(output_dir).glob("serving-*.json"))]


def failures(value: Any, where: str = "") -> list[str]:
    """Every {"failed": ...} in a record, with where it is."""
    if isinstance(value, dict):
        if "failed" in value:
            return [f"{where}: {value['failed']}"]
        return [f for key, item in value.items() for f in failures(item, f"{where}/{key}")]
    return []


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_records:
        records = load_records(args.output_dir)
    else:
        import peft
        import transformers

        environment = {
            "dtype": args.dtype,
            "device": args.device,
            "repeats": args.repeats,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "peft_version": peft.__version__,
            "code_version": code_version(),
            "library_changes": library_changes(),
            "machine": machine(),
            "command": " ".join(["python", "benchmarks/serving.py", *(sys.argv[1:] if argv is None else argv)]),
        }
        records = []
        for name in _split(args.model):
            record = run_model(name, args, environment)
            records.append(record)
            if args.output_dir:
                path = record_path(args.output_dir, name, args.tag)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(record, indent=2) + "\n")
                print(f"[{name}] wrote {path}", flush=True)
    tables = format_tables(records)
    print(tables)
    if args.report:
        shown = load_records(args.output_dir) if args.output_dir and not args.from_records else records
        write_report(args.report, format_tables(shown))
    if args.plot:
        plot(records, args.plot)
    return records


# --------------------------------------------------------------------------------------------------
# report and plot
def _ms(entry: Any, *path: str) -> str:
    value = _get(entry, *path, "median_s")
    return "-" if value is None else f"{value * 1e3:.3g}"


def _get(entry: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(entry, dict):
            return None
        entry = entry.get(key)
    return entry


def _state(entry: Any) -> str | None:
    """The cell of a skipped ("skipped") or failed ("FAILED") entry, its reason going to the notes; else None."""
    if isinstance(entry, dict) and "skipped" in entry:
        return "skipped"
    if isinstance(entry, dict) and "failed" in entry:
        return "FAILED"
    return None


def _num(value: float | None, digits: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{digits}}{suffix}"


def _cell(entry: Any, *path: str) -> str:
    return _state(entry) or _ms(entry, *path)


def _label(record: dict[str, Any]) -> str:
    """The model, with the run's tag when it has one (several runs of one model in one report)."""
    return record["model"] + (f" ({record['tag']})" if record.get("tag") else "")


def format_tables(records: list[dict[str, Any]]) -> str:
    """The Markdown tables of docs/serving.md, from the records only."""
    if not records:
        return "No serving records yet (`docs/results/serving-*.json`): run the full command above, then `--report`."
    out: list[str] = []
    notes: list[str] = []
    out += ["### Models and adapters", ""]
    out += [
        "| model | layers | hidden | FFN | heads / KV heads x dim | vocab | parameters | S2FT per adapter (modules, "
        "max \\|S\\|) | LoRA rank (per adapter) | batch x prompt, decode steps | repeats | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        s, m = r["shape"], r["methods"]
        out.append(
            f"| {_label(r)} | {s['num_hidden_layers']} | {s['hidden_size']} | {s['intermediate_size']} "
            f"| {s['num_attention_heads']} / {s['num_key_value_heads']} x {s['head_dim']} | {s['vocab_size']} "
            f"| {s['parameters'] / 1e6:.1f}M | {m['s2ft']['trainable_per_adapter']:,} ({m['s2ft']['adapted_modules']}, "
            f"{m['s2ft']['max_selected']}) | {m['lora']['rank']} ({m['lora']['trainable_per_adapter']:,}) "
            f"| {r['batch']} x {r['seq_len']}, {r['decode_tokens']} | {r['repeats']} | {r.get('code_version')} |"
        )
    switched = [r for r in records if "switch" in r]
    if switched:
        out += ["", "### Switching adapters (ms, median)", ""]
        out += [
            "| model | hidden | S2FT merged | LoRA merged | LoRA / S2FT | S2FT merged, set_adapter only | S2FT hotswap "
            "| LoRA hotswap | S2FT hotswap, merged | S2FT merged restores bit for bit | LoRA weight drift after the "
            "switches |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in switched:
            sw = r["switch"]
            merged, hot, hot_merged = sw["merged"], sw["hotswap"], sw.get("hotswap_merged", {})
            out.append(
                f"| {_label(r)} | {r['shape']['hidden_size']} | {_cell(merged.get('s2ft'))} "
                f"| {_cell(merged.get('lora'))} | {_num(sw.get('merged_speedup'), '.1f', 'x')} "
                f"| {_cell(sw.get('merged_set_adapter', {}).get('s2ft'))} | {_cell(hot.get('s2ft'))} "
                f"| {_cell(hot.get('lora'))} | {_cell(hot_merged.get('s2ft'))} "
                f"| {_get(merged, 's2ft', 'restored_bit_exact')} "
                f"| {_num(_get(merged, 'lora', 'max_weight_drift'), '.2g')} |"
            )
            notes += _notes(_label(r), "switch", sw)
    mixed = [r for r in records if "mixed" in r]
    if mixed:
        out += ["", "### Mixed-adapter batches (rows round-robin over k adapters)", ""]
        out += [
            "| model | k | base prefill ms | S2FT prefill ms | LoRA prefill ms | S2FT / LoRA (floor) "
            "| S2FT prefill tok/s | LoRA prefill tok/s | base decode ms | S2FT decode ms | LoRA decode ms "
            "| S2FT / LoRA decode (floor) | max abs diff vs per-row (S2FT, LoRA) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mixed:
            for k, e in r["mixed"].items():
                s2ft, lora = e.get("s2ft"), e.get("lora")
                diffs = ", ".join(_num(_get(x, "check", "max_abs_diff"), ".1e") for x in (s2ft, lora))
                out.append(
                    f"| {_label(r)} | {k} | {_ms(e, 'base', 'prefill')} | {_cell(s2ft, 'prefill')} "
                    f"| {_cell(lora, 'prefill')} | {_num(e.get('prefill_ratio'))} ({_num(e.get('prefill_floor'))}) "
                    f"| {_num(_get(s2ft, 'prefill', 'tokens_per_s'), '.0f')} "
                    f"| {_num(_get(lora, 'prefill', 'tokens_per_s'), '.0f')} | {_ms(e, 'base', 'decode')} "
                    f"| {_cell(s2ft, 'decode')} | {_cell(lora, 'decode')} "
                    f"| {_num(e.get('decode_ratio'))} ({_num(e.get('decode_floor'))}) | {diffs} |"
                )
                notes += _notes(_label(r), f"mixed k={k}", e)
    unmerged = [r for r in records if "unmerged" in r]
    if unmerged:
        out += ["", "### One unmerged adapter against the base model", ""]
        out += [
            "| model | base prefill ms | S2FT | LoRA | S2FT overhead | LoRA overhead | base decode ms | S2FT | LoRA "
            "| S2FT overhead | LoRA overhead |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in unmerged:
            u = r["unmerged"]
            cells = []
            for phase in ("prefill", "decode"):
                cells += [_ms(u, "base", phase), _cell(u.get("s2ft"), phase), _cell(u.get("lora"), phase)]
                cells += [_num(_get(u, m, phase, "overhead"), "+.1%") for m in ("s2ft", "lora")]
            out.append(f"| {_label(r)} | " + " | ".join(cells) + " |")
            notes += _notes(_label(r), "unmerged", u)
    fused = [r for r in records if "fusion" in r]
    if fused:
        out += ["", "### Fusing two adapters", ""]
        out += [
            "| model | S2FT (linear) ms | LoRA (cat) ms | S2FT / LoRA | S2FT max abs diff vs a+b active | LoRA |",
            "|---|---|---|---|---|---|",
        ]
        for r in fused:
            f = r["fusion"]
            out.append(
                f"| {_label(r)} | {_cell(f.get('s2ft'))} | {_cell(f.get('lora'))} | {_num(f.get('s2ft_vs_lora'))} "
                f"| {_num(_get(f, 's2ft', 'max_abs_diff'), '.1e')} | {_num(_get(f, 'lora', 'max_abs_diff'), '.1e')} |"
            )
            notes += _notes(_label(r), "fusion", f)
    exported = [r for r in records if "export" in r]
    if exported:
        out += ["", "### S2FT adapter exported as an exact LoRA (for vLLM)", ""]
        out += [
            "| model | max \\|S\\| | vLLM rank R (`--max-lora-rank`) | max abs diff vs S2FT | S2FT file MB "
            "| LoRA file MB | export ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in exported:
            e = r["export"].get("s2ft", {})
            if _state(e):
                out.append(f"| {_label(r)} | {r['methods']['s2ft']['max_selected']} | {_state(e)} | | | | |")
            else:
                sizes = [_num(e.get(k) and e[k] / 1e6) for k in ("s2ft_file_bytes", "lora_file_bytes")]
                out.append(
                    f"| {_label(r)} | {r['methods']['s2ft']['max_selected']} "
                    f"| {e['vllm_rank'] if e.get('vllm_rank') else 'above 512: refused'} "
                    f"| {_num(e['check']['max_abs_diff'], '.1e')} | {sizes[0]} | {sizes[1]} "
                    f"| {_num(e['export_s'] * 1e3, '.3g')} |"
                )
            notes += _notes(_label(r), "export", r["export"])
    out += ["", "### Against the targets", ""]
    out += ["| model | target | value | floor (base / LoRA) | met |", "|---|---|---|---|---|"]
    for r in records:
        for t in r.get("targets", []):
            met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
            out.append(
                f"| {_label(r)} | {t['target']} | {_num(t['value'], '.3g')} | {_num(t.get('floor'), '.3g')} | {met} |"
            )
    if notes:
        out += ["", *sorted(dict.fromkeys(notes))]
    return "\n".join(out)


def _notes(model: str, where: str, section: dict[str, Any]) -> list[str]:
    found = []
    for key, entry in section.items():
        if isinstance(entry, dict) and ("skipped" in entry or "failed" in entry):
            kind = "skipped" if "skipped" in entry else "failed"
            found.append(f"- {model}, {where}, {key} {kind}: {entry[kind]}")
        elif isinstance(entry, dict) and key in ("merged", "merged_set_adapter", "hotswap", "hotswap_merged"):
            found += _notes(model, f"{where} {key}", entry)
    return found


def write_report(path: str | Path, tables: str) -> None:
    """Put `tables` between the markers of `path` (appending the markers if it has none)."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    start, end = MARKERS
    block = f"{start}\n{tables}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)


def plot(records: list[dict[str, Any]], path: str | Path) -> None:
    """Four panels per model: switch times, mixed-batch S2FT / LoRA, unmerged overhead, fusion times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [_label(r) for r in records]
    xs = range(len(models))
    fig, axes = plt.subplots(4, 1, figsize=(max(8, 2.2 * len(models)), 14))

    def bars(ax, series: dict[str, list[float | None]], ylabel: str, log: bool = False) -> None:
        """Grouped bars; a missing value (skipped, not measured) leaves a gap."""
        width = 0.8 / max(1, len(series))
        for i, (label, values) in enumerate(series.items()):
            offset = (i - (len(series) - 1) / 2) * width
            heights = [float("nan") if v is None else v for v in values]
            ax.bar([x + offset for x in xs], heights, width, label=label)
        ax.set_xticks(list(xs), models)
        ax.set_ylabel(ylabel)
        shown = [v for values in series.values() for v in values if v is not None and v > 0]
        if log and shown:
            ax.set_yscale("log")
            ax.set_ylim(bottom=min(shown) / 2)
        ax.legend(fontsize="small", ncol=3)

    def ms(r: dict, *keys: str) -> float | None:
        value = _get(r, *keys, "median_s")
        return None if value is None else value * 1e3

    switches = {
        "s2ft merged": ("merged", "s2ft"),
        "lora merged": ("merged", "lora"),
        "s2ft merged, set_adapter": ("merged_set_adapter", "s2ft"),
        "s2ft hotswap": ("hotswap", "s2ft"),
        "lora hotswap": ("hotswap", "lora"),
        "s2ft hotswap, merged": ("hotswap_merged", "s2ft"),
    }
    series = {label: [ms(r, "switch", kind, m) for r in records] for label, (kind, m) in switches.items()}
    bars(axes[0], series, "switch ms (log)", log=True)
    counts = sorted({int(k) for r in records for k in r.get("mixed", {})})
    bars(axes[1], {
        f"k={k} {phase}": [_get(r, "mixed", str(k), f"{phase}_ratio") for r in records]
        for k in counts for phase in ("prefill", "decode")
    }, "mixed batch: S2FT / LoRA")  # fmt: skip
    axes[1].axhline(MIXED_TARGET, color="black", linewidth=0.8, linestyle="--")
    bars(axes[2], {
        f"{m} {phase}": [_get(r, "unmerged", m, phase, "overhead") for r in records]
        for m in METHODS for phase in ("prefill", "decode")
    }, "unmerged: time / base - 1")  # fmt: skip
    axes[2].axhline(0.0, color="black", linewidth=0.8)
    bars(axes[3], {m: [ms(r, "fusion", m) for r in records] for m in METHODS}, "fusion ms (log)", log=True)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    found = [f for r in main() for f in failures(r, r["model"])]
    if found:
        print("FAILED checks:\n" + "\n".join(found), file=sys.stderr)
        sys.exit(1)
