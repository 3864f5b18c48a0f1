"""``moa serve`` on Ray Serve: the cost per request of the Ray hop, and the affinity hit rate.

On the default base (SmolLM2-135M-Instruct, NF4) with 16 random LoRA adapters (rank 8, made
here and saved as PEFT folders), no router, greedy, ``--new-tokens`` new tokens per request
(``min_tokens`` too, so every request costs the same):

1. **Overhead.** The same engine settings served two ways, each alone on the machine:
   a plain ``moa serve`` (a subprocess, uvicorn) and the Ray application
   (:mod:`moa.serve.ray_app`) with ONE engine replica, given the same torch threads. Requests
   cycle over 4 adapters, resident in both (no loads). At 1 client: mean and p50 latency,
   and Ray's overhead per request (mean Ray minus mean plain); at 16 clients: throughput
   and latency, and the ratios Ray / plain. On a small CPU machine these are ratios of the
   hop's cost to a request's, not speed-ups: Ray's proxy, ingress and replica share the
   cores with the engine.
2. **Affinity.** Two engine replicas, each holding at most 4 adapters (``max_loras=4``) and
   4 residency keys; requests name one of the 16 adapters drawn from a Zipf law
   (``--zipf-s``), ``--zipf-clients`` at a time. Run with affinity routing (residency keys,
   Ray's multiplexing) and without (Ray's plain power-of-two-choices). Reports the hit rate
   (``x-moa-key-resident``: the replica held the adapter as the request arrived), the
   adapter loads (both replicas), throughput, and for reference the Zipf mass of the 8 most
   frequent adapters (what 8 slots hold at best when each adapter lives on one replica).

Run (the full measurement)::

    .venv/bin/python benchmarks/ray_overhead.py

``--quick`` runs a reduced form (fewer requests) and writes ``ray_overhead_quick.json``.
Writes JSON to ``benchmarks/results/ray_overhead.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ADAPTERS = 16
RANK = 8
OVERHEAD_ADAPTERS = 4
REPLICA_SLOTS = 4
STARTUP_TIMEOUT = 600.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_adapters(root: Path) -> dict[str, str]:
    """16 random LoRA adapters of the default base, as PEFT folders: ``{name: folder}``."""
    import torch

    import moa

    model = moa.MixtureModel.from_pretrained("default")
    folders = {}
    for i in range(ADAPTERS):
        name = f"a{i:02d}"
        torch.manual_seed(i)
        model.add_adapter(name, moa.LoraConfig(r=RANK, lora_alpha=2 * RANK, init_lora_weights=False,
                                               target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
        folders[name] = str(root / name)
        model.save_adapter(name, folders[name])
        model.delete_adapter(name)
    return folders


def post(base_url: str, model: str, prompt: str, new_tokens: int) -> tuple[float, dict[str, str]]:
    """One greedy completion; returns (seconds, lower-cased headers)."""
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "min_tokens": new_tokens, "temperature": 0}
    request = urllib.request.Request(f"{base_url}/v1/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        response.read()
        headers = {k.lower(): v for k, v in response.headers.items()}
    return time.perf_counter() - started, headers


def load(base_url: str, models: list[str], clients: int, new_tokens: int) -> dict[str, Any]:
    """Send one request per entry of ``models``, ``clients`` at a time; latency and throughput."""
    prompts = [f"Request {i}: summarise the following in one line." for i in range(len(models))]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda i: post(base_url, models[i], prompts[i], new_tokens), range(len(models))))
    wall = time.perf_counter() - started
    latencies = sorted(seconds for seconds, _ in answers)
    return {"requests": len(models), "clients": clients, "wall_s": wall,
            "tokens_per_s": len(models) * new_tokens / wall, "mean_s": statistics.fmean(latencies),
            "p50_s": latencies[len(latencies) // 2], "p99_s": latencies[min(len(latencies) - 1,
                                                                             int(0.99 * len(latencies)))],
            "headers": [headers for _, headers in answers]}


def wait_ready(base_url: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=10) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{base_url} did not become healthy in {STARTUP_TIMEOUT} s")


def overhead_rows(args: argparse.Namespace, base_url: str, label: str, results: dict[str, Any]) -> None:
    """Warm up, then 1 and 16 clients over the first 4 adapters; rows go to ``results``."""
    names = [f"a{i:02d}" for i in range(OVERHEAD_ADAPTERS)]
    load(base_url, names * 2, 2, args.new_tokens)  # warm-up: every adapter loaded, threads started
    for clients, count in ((1, args.requests_1), (16, args.requests_16)):
        models = [names[i % len(names)] for i in range(count)]
        row = load(base_url, models, clients, args.new_tokens)
        row.pop("headers")
        results[f"{label} {clients}"] = row
        print(f"  {label:6s} {clients:2d} clients: {row['tokens_per_s']:7.1f} tok/s, mean {row['mean_s']:.3f} s, "
              f"p50 {row['p50_s']:.3f} s", flush=True)


def plain_runs(args: argparse.Namespace, folders: dict[str, str], threads: int, results: dict[str, Any]) -> None:
    """A plain ``moa serve`` (a subprocess, before Ray starts), 1 and 16 clients."""
    modules = [f"{n}={folders[n]}" for n in folders]
    port = free_port()
    moa_cli = Path(sys.executable).with_name("moa")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([str(moa_cli), "serve", "--port", str(port), "--lora-modules", *modules, "--no-router",
                             "--max-loras", str(ADAPTERS), "--log-level", "warning"], env=env)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        overhead_rows(args, f"http://127.0.0.1:{port}", "plain", results)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def ray_overhead_runs(args: argparse.Namespace, folders: dict[str, str], threads: int,
                      results: dict[str, Any]) -> dict[str, Any]:
    """The Ray application with one engine replica, 1 and 16 clients; the ratios to plain."""
    from ray import serve

    from moa.serve.ray_app import APP_NAME, build_app
    from moa.serve.ray_options import RayServeOptions

    options = RayServeOptions(lora_modules=folders, no_router=True, max_loras=ADAPTERS, replicas=1,
                              replica_cpus=threads, threads=threads)
    serve.run(build_app(options), name=APP_NAME, route_prefix="/", blocking=False)
    overhead_rows(args, args.ray_url, "ray", results)
    serve.delete(APP_NAME)
    plain1, ray1 = results["plain 1"], results["ray 1"]
    plain16, ray16 = results["plain 16"], results["ray 16"]
    return {"rows": results,
            "ray_overhead_ms_per_request_1_client": 1000 * (ray1["mean_s"] - plain1["mean_s"]),
            "ray_over_plain_latency_1_client": ray1["mean_s"] / plain1["mean_s"],
            "ray_over_plain_throughput_16_clients": ray16["tokens_per_s"] / plain16["tokens_per_s"],
            "ray_over_plain_latency_16_clients": ray16["mean_s"] / plain16["mean_s"]}


def zipf_models(count: int, s: float, seed: int) -> list[str]:
    weights = [1.0 / (rank + 1) ** s for rank in range(ADAPTERS)]
    rng = random.Random(seed)
    return [f"a{i:02d}" for i in rng.choices(range(ADAPTERS), weights=weights, k=count)]


def affinity_runs(args: argparse.Namespace, folders: dict[str, str], threads: int) -> dict[str, Any]:
    """Two replicas of 4 slots; Zipf traffic over 16 adapters, with and without affinity."""
    from ray import serve

    from moa.serve.ray_app import APP_NAME, build_app
    from moa.serve.ray_options import RayServeOptions

    models = zipf_models(args.zipf_requests, args.zipf_s, seed=0)
    weights = sorted((1.0 / (rank + 1) ** args.zipf_s for rank in range(ADAPTERS)), reverse=True)
    out: dict[str, Any] = {"zipf_s": args.zipf_s, "requests": len(models), "clients": args.zipf_clients,
                           "top8_mass": sum(weights[:2 * REPLICA_SLOTS]) / sum(weights)}
    per_replica = max(1, threads // 2)
    for affinity in (True, False):
        options = RayServeOptions(lora_modules=folders, no_router=True, max_loras=REPLICA_SLOTS,
                                  keys_per_replica=REPLICA_SLOTS, replicas=2, replica_cpus=per_replica,
                                  threads=per_replica, affinity=affinity)
        serve.run(build_app(options), name=APP_NAME, route_prefix="/", blocking=False)
        row = load(args.ray_url, models, args.zipf_clients, args.new_tokens)
        headers = row.pop("headers")
        warm = len(headers) // 10  # the first tenth fills the caches
        hits = [h["x-moa-key-resident"] == "1" for h in headers]
        loads: dict[str, int] = {}
        for h in headers:
            loads[h["x-moa-replica"]] = max(loads.get(h["x-moa-replica"], 0), int(h["x-moa-adapter-loads"]))
        row.update({"hit_rate": sum(hits) / len(hits), "hit_rate_after_warmup": sum(hits[warm:]) / len(hits[warm:]),
                    "adapter_loads": sum(loads.values()), "replicas_serving": len(loads)})
        label = "affinity" if affinity else "no affinity"
        out[label] = row
        print(f"  {label:11s}: hit rate {row['hit_rate_after_warmup']:.2f} after warm-up ({row['hit_rate']:.2f} all), "
              f"{row['adapter_loads']} adapter loads, {row['tokens_per_s']:.1f} tok/s", flush=True)
        serve.delete(APP_NAME)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--requests-1", type=int, default=32, help="requests at 1 client")
    parser.add_argument("--requests-16", type=int, default=128, help="requests at 16 clients")
    parser.add_argument("--zipf-requests", type=int, default=400)
    parser.add_argument("--zipf-clients", type=int, default=4)
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--quick", action="store_true", help="a reduced run (8 / 32 / 96 requests, 8 tokens)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.requests_1, args.requests_16, args.zipf_requests = 8, 8, 32, 96
    out_path = args.out or RESULTS / ("ray_overhead_quick.json" if args.quick else "ray_overhead.json")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    threads = os.cpu_count() or 1

    import ray
    from ray import serve

    with tempfile.TemporaryDirectory(prefix="moa-ray-bench-") as tmp:
        print(f"Making {ADAPTERS} adapters...", flush=True)
        folders = make_adapters(Path(tmp))
        print(f"Overhead ({threads} threads, {args.new_tokens} new tokens):", flush=True)
        rows: dict[str, Any] = {}
        plain_runs(args, folders, threads, rows)
        port = free_port()
        args.ray_url = f"http://127.0.0.1:{port}"
        ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            overhead = ray_overhead_runs(args, folders, threads, rows)
            print("Affinity (2 replicas, 4 adapters each, Zipf over 16):", flush=True)
            affinity = affinity_runs(args, folders, threads)
        finally:
            serve.shutdown()
            ray.shutdown()
    result = {"quick": args.quick, "new_tokens": args.new_tokens, "threads": threads, "machine": platform.platform(),
              "ray": ray.__version__, "overhead": overhead, "affinity": affinity}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Ray overhead at 1 client: {overhead['ray_overhead_ms_per_request_1_client']:.1f} ms per request "
          f"({overhead['ray_over_plain_latency_1_client']:.2f}x latency); at 16 clients: "
          f"{overhead['ray_over_plain_throughput_16_clients']:.2f}x throughput. Wrote {out_path}.")


if __name__ == "__main__":
    main()
