"""Memory of the default base, NF4 vs float32: proportional set size of one process, phase by phase.

Each variant runs in a fresh Python process (nothing shared with this one) and reports its
PSS (``/proc/<pid>/smaps_rollup``: shared pages divided among the processes mapping them,
so no double counting) at each phase:

* ``runtime``: after importing what that variant needs (torch, transformers, moa; NF4 also
  bitsandbytes), before loading;
* ``peak load``: the highest PSS seen while loading (sampled every 5 ms by a thread);
* ``loaded``, ``forward`` (a prefill of 16 rows x 64 tokens), ``generate`` (16 rows, 32 new tokens).

Variants: ``fp32`` (``quantization=None``), ``nf4`` (the default: the pre-quantized copy
from ``MOA_HOME``, written on first use, see :mod:`moa.model.nf4_cache`), and
``nf4 uncached`` (``MOA_NF4_CACHE=0``: quantized while loading from the float32 checkpoint,
how moa loaded NF4 before the cache). The model's own share is each phase minus ``runtime``.

``--serve`` also starts ``moa serve`` (default adapters and gate) in each precision, reads
its PSS when idle after start-up and after 32 requests from 16 clients, and checks that
``/metrics``' ``moa_process_pss_bytes`` agrees.

Writes ``benchmarks/results/base_memory.json``.

Run: ``.venv/bin/python benchmarks/base_memory.py [--serve] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "base_memory.json"
MIB = 2**20
PHASES = ("runtime", "peak load", "loaded", "forward", "generate")

#: Runs in the child process: prints one JSON line of PSS (MiB) per phase.
CHILD = r"""
import json, sys, threading, time
from moa.serve.process_memory import proportional_set_size_bytes as pss
quantization = None if sys.argv[1] == "none" else sys.argv[1]
import torch, transformers, moa
from moa.model.base_loading import load_base
if quantization:
    import bitsandbytes
torch.set_num_threads(2)
out = {"runtime": pss()}
peak, loading = [0.0], [True]
def sample():
    while loading[0]:
        peak[0] = max(peak[0], pss())
        time.sleep(0.005)
sampler = threading.Thread(target=sample)
sampler.start()
model, tokenizer = load_base("default", quantization=quantization)
loading[0] = False
sampler.join()
out["peak load"] = max(peak[0], pss())
out["loaded"] = pss()
ids = torch.randint(100, 20000, (16, 64), generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    model(ids, logits_to_keep=1)  # a prefill: the next token's logits only, as generate asks
    out["forward"] = pss()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                   do_sample=False, pad_token_id=0)
    out["generate"] = pss()
print(json.dumps({k: v / 2**20 for k, v in out.items()}))
"""


def run_child(quantization: str, cached: bool) -> dict[str, float]:
    env = dict(os.environ, MOA_NF4_CACHE="1" if cached else "0", TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, "-c", CHILD, quantization], capture_output=True, text=True, env=env,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pss_of(pid: int) -> float:
    from moa.serve.process_memory import proportional_set_size_bytes

    return proportional_set_size_bytes(pid) / MIB


def metrics_pss(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    match = re.search(r"^moa_process_pss_bytes (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) / MIB if match else float("nan")


def chat(port: int, index: int) -> None:
    adapters = ["sql", "code", "french", "arithmetic", "icd"]
    body = json.dumps({"model": adapters[index % len(adapters)], "max_tokens": 32, "temperature": 0,
                       "messages": [{"role": "user", "content": f"Question number {index}: what is {index} + 7?"}]})
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=600).read()


def serve_memory(quantization: str) -> dict[str, float]:
    port = free_port()
    env = dict(os.environ, TQDM_DISABLE="1")
    server = subprocess.Popen([sys.executable, "-m", "moa.cli", "serve", "--quantization", quantization,
                               "--port", str(port), "--log-level", "warning"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moa serve --quantization {quantization} did not start") from None
                time.sleep(0.5)
        time.sleep(2.0)
        result = {"idle": pss_of(server.pid), "idle /metrics": metrics_pss(port)}
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: chat(port, i), range(32)))
        time.sleep(1.0)
        result["after 32 requests"] = pss_of(server.pid)
        return result
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per variant (medians reported)")
    parser.add_argument("--serve", action="store_true", help="also measure moa serve, idle and after 32 requests")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    run_child("nf4", cached=True)  # make sure the NF4 copy exists: its one-time writing is not what is measured
    variants = {"fp32": ("none", True), "nf4": ("nf4", True), "nf4 uncached": ("nf4", False)}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (quantization, cached) in variants.items():
            runs[name].append(run_child(quantization, cached))
    medians = {name: {phase: statistics.median(r[phase] for r in rs) for phase in PHASES} for name, rs in runs.items()}
    model_share = {name: {phase: m[phase] - m["runtime"] for phase in PHASES[1:]} for name, m in medians.items()}
    print(f"PSS in MiB, median of {args.rounds} fresh processes per variant")
    print(f"  {'variant':<14}" + "".join(f"{p:>11}" for p in PHASES))
    for name, m in medians.items():
        print(f"  {name:<14}" + "".join(f"{m[p]:11.0f}" for p in PHASES))
    print("model's share (phase - runtime):")
    for name, m in model_share.items():
        print(f"  {name:<14}" + " " * 11 + "".join(f"{m[p]:11.0f}" for p in PHASES[1:]))
    ratios = {phase: medians["nf4"][phase] / medians["fp32"][phase] for phase in PHASES[1:]}
    share_ratios = {phase: model_share["nf4"][phase] / model_share["fp32"][phase] for phase in PHASES[1:]}
    result: dict[str, Any] = {
        "machine": platform.platform(), "python": sys.version.split()[0], "rounds": args.rounds,
        "command": "python benchmarks/base_memory.py " + " ".join(sys.argv[1:]),
        "pss_mib": medians, "model_share_mib": model_share, "all": runs,
        "nf4_over_fp32": ratios, "nf4_over_fp32_model_share": share_ratios,
    }
    if args.serve:
        serve = {"fp32": serve_memory("none"), "nf4": serve_memory("nf4")}
        result["serve_pss_mib"] = serve
        result["serve_idle_nf4_over_fp32"] = serve["nf4"]["idle"] / serve["fp32"]["idle"]
        result["serve_after_requests_nf4_over_fp32"] = serve["nf4"]["after 32 requests"] / serve["fp32"]["after 32 requests"]
        for name, values in serve.items():
            print(f"  moa serve {name:<5} " + ", ".join(f"{k} {v:.0f}" for k, v in values.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
