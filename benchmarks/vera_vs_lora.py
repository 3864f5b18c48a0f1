"""VeRA vs LoRA in one mixed batch: 16 rows over 8 adapters, step time relative to the base.

Four moa models, each over its own copy of the base, hold 8 LoRA adapters, 8 VeRA adapters
of the same rank on the same modules (default: rank 256, PEFT's VeRA default, on ``q_proj``
and ``v_proj``; all 8 share one random projection) on moa-vera's default generic path, the
same 8 VeRA adapters with the grouped hook removed, and the same 8 on the batched low-rank
path (``VeraLayer.batched = True``). A forward of 16 rows x ``--seq`` tokens (row i on
adapter i % 8, KV cache off, no grad) is timed for each variant:

* ``base``: the plain transformers model (no wrappers), the denominator of every ratio
* ``lora-8``: the 8 LoRA adapters
* ``vera-8 grouped``: the 8 VeRA adapters as moa-vera runs them by default: one
  ``VeraLayer.grouped_delta`` call per layer, one shrink by ``A`` and one expand by ``B``
  over all VeRA rows (they share the projection), per-row vectors in between
* ``vera-8 per-adapter``: the same adapters, one ``delta()`` per adapter per layer (what
  moa does for a generic type without ``grouped_delta``)
* ``vera-8 batched``: the same adapters on moa's batched low-rank kernels (``lambda ⊙ A``,
  ``lambda ⊙ B`` held per module)

Rounds interleave the variants (one call of each per round) and medians are reported, so
drift on the machine hits every variant alike. A layer-level section times one adapted
``q_proj`` (16 rows x ``--seq`` tokens, 8 VeRA adapters sharing one projection) three ways,
each adding the weighted updates to the base output as ``MixtureLinear`` does: the batched
low-rank kernels, the per-adapter ``delta()`` loop, and ``VeraLayer.grouped_delta``. It also
reports the ``adapter_model.safetensors`` size of one VeRA adapter (with and without its
projections) and one LoRA adapter, and the memory each variant's adapters hold.

Run: ``.venv/bin/python benchmarks/vera_vs_lora.py [--rounds 5] [--seq 16 1] [--base default|tiny]``
Writes ``benchmarks/results/vera_vs_lora.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import moa
from moa.kernels import autograd as moa_autograd
from moa.kernels import backend_for
from moa.adapters.base import AdapterLayer, GroupedRows
from moa.kernels.metadata import LoraStack, build_metadata
from moa.model.targets import linear_features, resolve_target_modules
from moa_vera import VeraConfig, VeraLayer

BATCH, ADAPTERS = 16, 8


class BatchedVeraLayer(VeraLayer):
    """VeRA on moa's batched low-rank kernels: ``low_rank()`` gives ``(lambda_d ⊙ A, lambda_b ⊙ B, 1)``."""

    batched = True


class PerAdapterVeraLayer(VeraLayer):
    """VeRA without the grouped hook: moa calls ``delta()`` once per adapter per layer."""

    grouped_delta = AdapterLayer.__dict__["grouped_delta"]  # the default, which moa never calls


def load_base_copy(base: str) -> torch.nn.Module:
    """A fresh fp32 eval-mode copy of the base."""
    if base == "tiny":
        from moa.testing import make_tiny_base

        return make_tiny_base()
    from moa.model.base_loading import default_base_path, load_base

    return load_base(default_base_path(), quantization=None)[0].eval()


def build_models(base: str, rank: int, targets: list[str]) -> dict[str, moa.MixtureModel]:
    """One moa model per adapter set, each holding only its own 8 adapters (over its own copy of the base).

    ``lora``: 8 LoRA adapters; ``vera``: 8 VeRA adapters (the default, generic path, grouped);
    ``vera_per_adapter`` and ``vera_batched``: the same 8 VeRA adapters (same vectors) without
    the grouped hook and on the batched path. Separate models, so the adapters of one set
    never enlarge another set's kernel buffers.
    """
    copies = {"vera_per_adapter": PerAdapterVeraLayer, "vera_batched": BatchedVeraLayer}
    models = {kind: moa.MixtureModel(load_base_copy(base)) for kind in ("lora", "vera", *copies)}
    for i in range(ADAPTERS):
        torch.manual_seed(100 + i)
        models["lora"].add_adapter(f"a{i}", moa.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                                                          init_lora_weights=False))
        models["vera"].add_adapter(f"a{i}", VeraConfig(r=rank, target_modules=targets))
        with torch.no_grad():
            for layer in models["vera"].adapter_layers(f"a{i}").values():
                layer.vera_lambda_b.normal_(std=0.1)
                layer.vera_lambda_d.normal_()
        for kind, layer_class in copies.items():
            config = VeraConfig(r=rank, target_modules=targets)
            layers = {}
            for module_name, source in models["vera"].adapter_layers(f"a{i}").items():
                features = linear_features(models[kind].bank.base_layer(module_name))
                layer = layer_class(config, module_name, *features)
                layer.load_state_dict(source.state_dict())
                layers[module_name] = layer
            models[kind].install_adapter(f"a{i}", config, layers)
    for model in models.values():
        model.eval()
    return models


def time_rounds(variants: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Interleaved timings: one call of every variant per round; round 0 is warm-up."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(rounds + 1):
        for name, run in variants.items():
            start = time.perf_counter()
            with torch.no_grad():
                run()
            if round_index:
                times[name].append(time.perf_counter() - start)
    return times


def bench_model(plain: torch.nn.Module, models: dict[str, moa.MixtureModel], seq: int, rounds: int) -> dict[str, Any]:
    ids = torch.randint(0, int(plain.config.vocab_size) - 2, (BATCH, seq), generator=torch.Generator().manual_seed(0))
    rows = [f"a{i % ADAPTERS}" for i in range(BATCH)]
    with torch.no_grad():
        outputs = {kind: models[kind](ids, adapter_names=rows, use_cache=False).logits
                   for kind in ("vera", "vera_per_adapter", "vera_batched")}
    variants = {
        "base": lambda: plain(ids, use_cache=False),
        "lora-8": lambda: models["lora"](ids, adapter_names=rows, use_cache=False),
        "vera-8 grouped": lambda: models["vera"](ids, adapter_names=rows, use_cache=False),
        "vera-8 per-adapter": lambda: models["vera_per_adapter"](ids, adapter_names=rows, use_cache=False),
        "vera-8 batched": lambda: models["vera_batched"](ids, adapter_names=rows, use_cache=False),
    }
    times = time_rounds(variants, rounds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "seq": seq,
        "median_seconds": medians,
        "ratio_to_base": {name: value / medians["base"] for name, value in medians.items()},
        "all_seconds": times,
        "max_abs_logit_diff_to_per_adapter": {kind: float((outputs[kind] - outputs["vera_per_adapter"]).abs().max())
                                              for kind in ("vera", "vera_batched")},
        "max_abs_logit": float(outputs["vera_per_adapter"].abs().max()),
    }


def bench_layer(model: moa.MixtureModel, seq: int, rounds: int) -> dict[str, Any]:
    """One adapted q_proj, 16 rows x seq tokens over 8 VeRA adapters: three ways to compute the adapters' part.

    ``model`` holds the adapters on the batched path; their ``delta()`` and ``grouped_delta``
    are timed on the same layers (both work whatever the path).
    """
    module_name = next(m for m in model.adapter_layers("a0") if m.endswith("q_proj"))
    layers = [model.adapter_layers(f"a{i}")[module_name] for i in range(ADAPTERS)]
    in_f, out_f = layers[0].in_features, layers[0].out_features
    tokens = BATCH * seq
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(1))
    row_adapter = (torch.arange(BATCH) % ADAPTERS).repeat_interleave(seq)
    ids = row_adapter[:, None].to(torch.int32)
    meta = build_metadata(ids, torch.ones(tokens, 1), ADAPTERS)
    with torch.no_grad():
        factors = [layer.low_rank() for layer in layers]
    stack = LoraStack([f[0] for f in factors], [f[1] for f in factors], [1.0] * ADAPTERS, in_f, out_f)
    backend = backend_for(x.device)
    out = torch.zeros(tokens, out_f)

    def per_adapter() -> torch.Tensor:  # MixtureLinear's loop for a generic type without grouped_delta
        result = out.clone()
        for slot, layer in enumerate(layers):
            start, end = meta.pairs_of(slot)
            index, weight = meta.token_index[start:end], meta.pair_weight[start:end]
            result.index_add_(0, index, layer.delta(x.index_select(0, index), None) * weight[:, None])
        return result

    def grouped() -> torch.Tensor:  # MixtureLinear's one call for all of the class's adapters
        rows = GroupedRows(tuple(layers), meta.token_index, meta.offsets)
        delta = VeraLayer.grouped_delta(x, rows, None)
        return out.clone().index_add_(0, meta.token_index, delta * meta.pair_weight[:, None])

    variants = {
        "batched low-rank kernels": lambda: moa_autograd.lora_mixture(x, stack, meta, out.clone(), backend=backend),
        "per-adapter delta": per_adapter,
        "grouped_delta (shared shrink)": grouped,
    }
    with torch.no_grad():
        results = {name: run() for name, run in variants.items()}
    reference = results["per-adapter delta"]
    times = time_rounds(variants, rounds * 8)  # cheap: more rounds steady the medians
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "module": module_name,
        "tokens": tokens,
        "median_seconds": medians,
        "max_abs_diff_to_per_adapter": {name: float((value - reference).abs().max())
                                        for name, value in results.items()},
    }


def file_sizes(models: dict[str, moa.MixtureModel], rank: int, targets: list[str]) -> dict[str, int]:
    """``adapter_model.safetensors`` bytes of one VeRA adapter (with / without projections) and one LoRA adapter."""
    sizes = {}
    vera = models["vera"]
    with tempfile.TemporaryDirectory() as tmp:
        vera.save_adapter("a0", Path(tmp) / "vera")
        vera.add_adapter("noproj", VeraConfig(r=rank, target_modules=targets, save_projection=False))
        vera.save_adapter("noproj", Path(tmp) / "vera_noproj")
        vera.delete_adapter("noproj")
        models["lora"].save_adapter("a0", Path(tmp) / "lora")
        for label, folder in (("vera (save_projection=True)", "vera"), ("vera (save_projection=False)", "vera_noproj"),
                              ("lora", "lora")):
            sizes[label] = (Path(tmp) / folder / "adapter_model.safetensors").stat().st_size
    return sizes


def resident_bytes(models: dict[str, moa.MixtureModel]) -> dict[str, int]:
    """Bytes the 8 adapters of each set hold in memory (parameters, VeRA's products and projections)."""
    def tensors_bytes(tensors: Any) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    def layers_of(model: moa.MixtureModel) -> list[Any]:
        return [layer for name in model.adapter_names for layer in model.adapter_layers(name).values()]

    result = {"lora-8": sum(tensors_bytes(layer.parameters()) for layer in layers_of(models["lora"]))}
    for label, kind in (("vera-8 grouped", "vera"), ("vera-8 per-adapter", "vera_per_adapter"),
                        ("vera-8 batched", "vera_batched")):
        layers = layers_of(models[kind])
        with torch.no_grad():  # the factors the batched path keeps (the same tensors each call), none when generic
            products = [t for layer in layers if layer.low_rank() is not None for t in layer.low_rank()[:2]]
        pairs = {id(layer.projection.pair()): layer.projection.pair() for layer in layers}
        result[label] = (sum(tensors_bytes(layer.parameters()) for layer in layers) + tensors_bytes(products)
                         + sum(pair.nbytes() for pair in pairs.values()))
    return result


def render(result: dict[str, Any]) -> str:
    lines = [f"\n{result['base']} base, batch {BATCH} rows over {ADAPTERS} adapters, rank {result['rank']} "
             f"on {result['targets']} (fp32, {result['threads']} threads; noisy on a shared CPU)"]
    for run in result["model"]:
        lines.append(f"\nforward of {BATCH} x {run['seq']} tokens   {'median s':>10} {'x base':>8}")
        for name, seconds in run["median_seconds"].items():
            lines.append(f"  {name:<28} {seconds:>10.4f} {run['ratio_to_base'][name]:>8.3f}")
        diffs = ", ".join(f"{kind} {value:.2e}" for kind, value in run["max_abs_logit_diff_to_per_adapter"].items())
        lines.append(f"  max |logit diff| to per-adapter: {diffs} (max |logit| {run['max_abs_logit']:.1f})")
    for run in result["layer"]:
        lines.append(f"\none {run['module']}, {run['tokens']} tokens        {'median ms':>10} {'max |diff|':>11}")
        for name, seconds in run["median_seconds"].items():
            lines.append(f"  {name:<30} {1000 * seconds:>10.3f} {run['max_abs_diff_to_per_adapter'][name]:>11.2e}")
    lines.append("\nadapter_model.safetensors bytes: "
                 + ", ".join(f"{k} {v:,}" for k, v in result["file_bytes"].items()))
    lines.append("resident adapter bytes (8 adapters): "
                 + ", ".join(f"{k} {v:,}" for k, v in result["resident_bytes"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--seq", type=int, nargs="+", default=[16, 1], help="tokens per row of each timed forward")
    parser.add_argument("--rank", type=int, default=256, help="rank of every adapter (VeRA's r, LoRA's r)")
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"], help="target module names")
    parser.add_argument("--base", choices=["default", "tiny"], default="default",
                        help="'default': SmolLM2-135M (converted once, offline); 'tiny': moa.testing's random Llama")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vera_vs_lora.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    plain = load_base_copy(args.base)
    resolve_target_modules(plain, args.targets)  # fail early on a bad --targets
    models = build_models(args.base, args.rank, args.targets)
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(argv),
        "base": args.base, "rank": args.rank, "targets": args.targets, "threads": torch.get_num_threads(),
        "rounds": args.rounds, "machine": platform.platform(), "torch": torch.__version__, "moa": moa.__version__,
        "model": [bench_model(plain, models, seq, args.rounds) for seq in args.seq],
        "layer": [bench_layer(models["vera_batched"], seq, args.rounds) for seq in args.seq],
        "resident_bytes": resident_bytes(models),
        "file_bytes": file_sizes(models, args.rank, args.targets),
    }
    print(render(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
