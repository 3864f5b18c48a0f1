"""``moa serve`` against vLLM-CPU: the same streamed chat requests, side by side in one run.

Servers (each a subprocess on 127.0.0.1, started once, all up for the whole run):

* ``moa-fp32``: ``moa serve --quantization none`` (the shipped base, its five demo adapters);
* ``moa-nf4``: ``moa serve`` with its default NF4 base;
* ``vllm``: ``vllm serve`` from ``.peers/vllm`` (see ``../shared/peers.md``), fp32, the same five
  adapters as LoRA modules (``--max-lora-rank 8``, their rank), its defaults otherwise (prefix
  caching and chunked prefill on, its own CPU binding). Skipped with a message when
  ``.peers/vllm`` is absent.

Workload: the shipped adapters' real test prompts, each request naming the adapter of its
prompt's domain (vLLM serves no mixtures and no router), chat template, greedy,
``--max-tokens`` new tokens at most (``--fixed-length``: exactly, via ``min_tokens``). At each
client count (``--clients``, default 1 16 32) every server gets the same requests; rounds are
interleaved (``--rounds``: A B A B ...), and the numbers pool the rounds. Each round and client
count takes prompts not sent before (and each round its own long prompt), so vLLM's prefix
cache (on by default) only ever reuses the chat template's system part, as with new traffic.

Per server and client count: tokens/s (completion tokens over wall time), request latency
p50/p99, time to first token p50/p99 and inter-token latency p99, all streamed with the
``openai`` client (an inter-token gap is the time between two chunks that carry text), and
how many answers equal vLLM's for the same request in the same round.

The scenario ``long_prompt``: ``--rows`` (16) streamed requests decode (``min_tokens`` keeps
them going) and, once each has streamed a few tokens, a prompt of ``--long-prompt-tokens``
(1,000) tokens arrives. Reported: the running rows' step (inter-token gap) p50/p99 before it
arrived, their gaps p99 and max from its arrival to its first token (the window), the
window's p99 over the steady p50, and the long prompt's time to first token (``long_prompt``:
the median over rounds; ``long_prompt_rounds``: each round).

While one server is measured the others idle; ``idle_cpu_share`` in the JSON records the CPU
they use at rest and meanwhile (a server that spins when idle would slow the others down).
Read ratios, not absolute numbers: the machine is shared and small. Writes JSON to
``benchmarks/results/serve_vs_vllm.json``; ``--quick`` is a smoke run (few requests, 1 and 4
clients, one round, moa fp32 and vLLM).

Run: ``.venv/bin/python benchmarks/serve_vs_vllm.py [--quick] [--servers moa-fp32 moa-nf4 vllm]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.request import urlopen

from serve_load import free_port, run_clients  # benchmarks/ is on sys.path: run as a script

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "serve_vs_vllm.json"
VLLM_VENV = ROOT / ".peers" / "vllm"
SERVED = "base"
SERVERS = ("moa-fp32", "moa-nf4", "vllm")


# -- servers -------------------------------------------------------------------------------


class ServerProcess:
    """A server subprocess listening on a free port of 127.0.0.1, ready once ``/health`` is 200.

    Used as a context manager: starts on enter (waiting up to ``startup_timeout``), and on exit
    sends SIGINT to the process group it started (the server and its own children), then
    SIGKILL after ``stop_timeout``.
    """

    def __init__(self, name: str, command: list[str], *, port: int, env: dict[str, str] | None = None,
                 log_path: Path | None = None, startup_timeout: float = 300.0, stop_timeout: float = 30.0) -> None:
        self.name, self.command, self.port = name, command, port
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path or Path(os.devnull)
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} while starting:\n"
                                   f"{self.log_tail()}")
            try:
                with urlopen(self.base_url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return self
            except OSError:  # not listening yet, or 503 while it starts
                pass
            time.sleep(1.0)
        self.__exit__(None, None, None)
        raise RuntimeError(f"{self.name} did not answer /health within {self.startup_timeout:.0f} s:\n"
                           f"{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's output (the log may lie in a temporary folder about to go)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __exit__(self, *exc: object) -> None:
        if not self.alive():
            return
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGINT)  # the group this object started (start_new_session)
        try:
            self.process.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) of every live process in process group ``pgid`` (Linux ``/proc``)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        if int(fields[2]) == pgid:  # fields after the name: state ppid pgrp ... utime(11) stime(12)
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def idle_cpu_shares(servers: list[ServerProcess], seconds: float = 5.0) -> dict[str, float]:
    """Each idle server's CPU use over ``seconds`` as a share of one CPU: all servers stay up during
    the run, so one that spins while idle would slow the one being measured."""
    before = {s.name: group_cpu_seconds(s.pid) for s in servers}
    time.sleep(seconds)
    return {s.name: round((group_cpu_seconds(s.pid) - before[s.name]) / seconds, 3) for s in servers}


def moa_executable() -> str:
    """The ``moa`` command of this interpreter's environment."""
    script = Path(sys.executable).with_name("moa")
    return str(script) if script.exists() else "moa"


class MoaServer(ServerProcess):
    """``moa serve ARGS --host 127.0.0.1 --port <free>``."""

    def __init__(self, args: list[str], *, name: str = "moa", log_path: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        port = free_port()
        super().__init__(name, [moa_executable(), "serve", *args, "--host", "127.0.0.1", "--port", str(port)],
                         port=port, env=env, log_path=log_path, startup_timeout=300.0)


class VllmServer(ServerProcess):
    """``vllm serve`` of the default base (fp32) with the shipped adapters, as ``../shared/peers.md`` says."""

    def __init__(self, base: str, adapters: dict[str, str], *, venv: Path = VLLM_VENV, log_path: Path | None = None,
                 max_model_len: int = 1024, max_num_seqs: int = 32, env: dict[str, str] | None = None) -> None:
        port = free_port()
        command = [str(venv / "bin" / "vllm"), "serve", base, "--served-model-name", SERVED, "--dtype", "float32",
                   "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs), "--enforce-eager",
                   "--enable-lora", "--max-loras", str(len(adapters)), "--max-cpu-loras", str(len(adapters)),
                   "--max-lora-rank", "8", "--lora-modules", *(f"{n}={p}" for n, p in adapters.items()),
                   "--host", "127.0.0.1", "--port", str(port)]
        super().__init__("vllm", command, port=port, log_path=log_path, startup_timeout=600.0,
                         env={"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
                              "HF_HUB_OFFLINE": "1", **(env or {})})


# -- measuring -----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``values``; ``None`` when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def stream_chat(client: Any, request: dict[str, Any], max_tokens: int, min_tokens: int) -> dict[str, Any]:
    """One streamed greedy chat request: its text, tokens, start and each text chunk's arrival time."""
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=request["model"], messages=[{"role": "user", "content": request["prompt"]}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"min_tokens": min_tokens} if min_tokens else None)
    parts, times, tokens, prompt_tokens = [], [], 0, 0
    for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            times.append(now)
        if chunk.usage is not None:
            tokens, prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
    return {"text": "".join(parts), "tokens": tokens, "prompt_tokens": prompt_tokens, "start": start,
            "times": times, "end": time.perf_counter()}


def openai_client(base_url: str) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0, timeout=3600)


def drive_streamed(base_url: str, requests: list[dict[str, Any]], clients: int, max_tokens: int,
                   min_tokens: int) -> tuple[list[dict[str, Any]], float]:
    """Send ``requests`` from ``clients`` threads (each takes the next); the answers in order and the wall time."""
    answers: list[Any] = [None] * len(requests)
    lock = threading.Lock()
    cursor = iter(range(len(requests)))

    def worker() -> None:
        client = openai_client(base_url)
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            answers[i] = stream_chat(client, requests[i], max_tokens, min_tokens)

    return answers, run_clients(worker, clients)


def summarize(answers: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Tokens/s, latency, time to first token and inter-token gaps of streamed answers."""
    latencies = [a["end"] - a["start"] for a in answers]
    ttft = [a["times"][0] - a["start"] for a in answers if a["times"]]
    gaps = [b - a for ans in answers for a, b in zip(ans["times"], ans["times"][1:])]
    tokens = sum(a["tokens"] for a in answers)
    r = lambda v: None if v is None else round(v, 4)  # noqa: E731
    return {"requests": len(answers), "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 2), "latency_p50_s": r(statistics.median(latencies)),
            "latency_p99_s": r(percentile(latencies, 0.99)), "ttft_p50_s": r(percentile(ttft, 0.5)),
            "ttft_p99_s": r(percentile(ttft, 0.99)), "itl_p50_s": r(percentile(gaps, 0.5)),
            "itl_p99_s": r(percentile(gaps, 0.99))}


def long_prompt_text(tokens: int, variant: int = 0) -> str:
    """User content whose chat prompt (the base's template) is about ``tokens`` tokens long; each
    ``variant`` starts elsewhere in the test prompts, so no two share a cached prefix."""
    from transformers import AutoTokenizer

    from moa.data import DOMAINS, load_split
    from moa.model.default_base import default_base_path
    from moa.serve.prompts import chat_prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(default_base_path())
    holder = SimpleNamespace(tokenizer=tokenizer)
    overhead = len(chat_prompt_ids(holder, [{"role": "user", "content": ""}]))
    pool = " ".join(s.prompt for d in DOMAINS for s in load_split(d, "test"))
    ids = tokenizer(pool, add_special_tokens=False)["input_ids"]
    first = (variant * (tokens - overhead)) % max(1, len(ids) - tokens)
    ids = ids[first: first + tokens - overhead]
    return tokenizer.decode(ids)


def long_prompt_scenario(base_url: str, requests: list[dict[str, Any]], long_text: str, decode_tokens: int,
                         warm_tokens: int = 6) -> dict[str, Any]:
    """``requests`` decode together; a long prompt arrives once each streamed ``warm_tokens``."""
    rows: list[dict[str, Any]] = [{"times": []} for _ in requests]
    threads = [threading.Thread(target=stream_chat_live, args=(openai_client(base_url), request, decode_tokens, live))
               for request, live in zip(requests, rows, strict=True)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 600
    while any(len(r["times"]) < warm_tokens and t.is_alive() for r, t in zip(rows, threads, strict=True)) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    arrived = time.perf_counter()
    answer = stream_chat(openai_client(base_url), {"model": requests[0]["model"], "prompt": long_text}, 8, 0)
    for thread in threads:
        thread.join()
    first = answer["times"][0] if answer["times"] else answer["end"]
    steady, window = [], []
    for r in rows:
        for a, b in zip(r["times"][1:], r["times"][2:]):  # from the second token: the first gap may hold a prefill
            if b <= arrived:
                steady.append(b - a)
            elif a < first:
                window.append(b - a)
    still = sum(1 for r in rows if r["times"] and r["times"][-1] > first)
    p50 = percentile(steady, 0.5)
    r4 = lambda v: None if v is None else round(v, 4)  # noqa: E731
    return {"rows": len(rows), "rows_decoding_after_its_first_token": still, "long_prompt_tokens":
            answer["prompt_tokens"], "long_prompt_ttft_s": r4(first - arrived), "steady_step_p50_s": r4(p50),
            "steady_step_p99_s": r4(percentile(steady, 0.99)), "window_gaps": len(window),
            "window_itl_p99_s": r4(percentile(window, 0.99)), "window_itl_max_s": r4(max(window, default=None)),
            "window_p99_over_steady_p50": r4(percentile(window, 0.99) / p50) if window and p50 else None}


def stream_chat_live(client: Any, request: dict[str, Any], tokens: int, live: dict[str, Any]) -> None:
    """Like :func:`stream_chat` with ``min_tokens = max_tokens``, appending arrival times to ``live`` as they come."""
    live["start"] = time.perf_counter()
    stream = client.chat.completions.create(
        model=request["model"], messages=[{"role": "user", "content": request["prompt"]}], max_tokens=tokens,
        temperature=0, stream=True, extra_body={"min_tokens": tokens})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            live["times"].append(time.perf_counter())


# -- the run -------------------------------------------------------------------------------


class PromptPool:
    """The shipped test prompts, the domains in turn, each handed out once: ``{prompt, model}`` requests
    naming the prompt's adapter."""

    def __init__(self) -> None:
        from moa.data import DOMAINS, load_split

        tests = {d: load_split(d, "test") for d in DOMAINS}
        depth = min(len(t) for t in tests.values())
        self.requests = [{"prompt": tests[d][i].prompt, "model": d} for i in range(depth) for d in DOMAINS]
        self.used = 0

    def take(self, count: int) -> list[dict[str, Any]]:
        """The next ``count`` requests.

        Raises:
            ValueError: fewer than ``count`` prompts left (lower ``--rounds`` or ``--requests-per-client``).
        """
        if self.used + count > len(self.requests):
            raise ValueError(f"Only {len(self.requests)} test prompts; this run asks for more. Lower --rounds or "
                             f"--requests-per-client.")
        self.used += count
        return self.requests[self.used - count: self.used]


def start_servers(names: list[str], log_dir: Path, vllm_venv: Path, vllm_env: dict[str, str],
                  moa_env: dict[str, str], moa_args: list[str] | None = None) -> list[ServerProcess]:
    """Start the named servers (vLLM only when its venv exists), each ready on return."""
    from moa.eval.assets import adapter_folders, shipped_adapters_dir
    from moa.model.default_base import default_base_path

    common = ["--served-model-name", SERVED, "--max-batch-size", "32", "--max-queue", "256", "--log-level", "warning"]
    started: list[ServerProcess] = []
    for name in names:
        if name == "vllm":
            if not (vllm_venv / "bin" / "vllm").exists():
                print(f"vLLM skipped: no {vllm_venv / 'bin' / 'vllm'} (install it as ../shared/peers.md says).")
                continue
            folders = {n: str(p) for n, p in adapter_folders(shipped_adapters_dir()).items()}
            server: ServerProcess = VllmServer(str(default_base_path()), folders, venv=vllm_venv,
                                               log_path=log_dir / "vllm.log", env=vllm_env)
        else:
            quantization = "none" if name == "moa-fp32" else "nf4"
            server = MoaServer(["--quantization", quantization, *common, *(moa_args or [])], name=name, log_path=log_dir / f"{name}.log",
                               env=moa_env)
        print(f"starting {name} ...", flush=True)
        started.append(server.__enter__())
    return started


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (A B A B ...)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--fixed-length", action="store_true", help="min_tokens = max_tokens (EOS masked)")
    parser.add_argument("--requests-per-client", type=int, default=2,
                        help="requests per client per round (at least 16, at most 64)")
    parser.add_argument("--rows", type=int, default=16, help="decoding rows of the long-prompt scenario")
    parser.add_argument("--long-prompt-tokens", type=int, default=1000)
    parser.add_argument("--decode-tokens", type=int, default=96, help="tokens each scenario row decodes")
    parser.add_argument("--vllm-venv", type=Path, default=VLLM_VENV)
    parser.add_argument("--vllm-env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more environment for vllm serve (e.g. VLLM_CPU_OMP_THREADS_BIND=0-1)")
    parser.add_argument("--moa-args", default="", metavar="'ARGS'",
                        help="more moa serve arguments, as one string: --moa-args='--max-step-tokens 64'")
    parser.add_argument("--moa-env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more environment for moa serve (e.g. OMP_NUM_THREADS=1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 and 4 clients, 4 requests, one round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.clients, args.rounds, args.max_tokens, args.rows, args.decode_tokens = [1, 4], 1, 8, 4, 24
        args.servers = [s for s in args.servers if s != "moa-nf4"]
    per_config = (lambda c: 4) if args.quick else (lambda c: min(64, max(16, args.requests_per_client * c)))
    min_tokens = args.max_tokens if args.fixed_length else 0
    vllm_env = dict(pair.split("=", 1) for pair in args.vllm_env)
    moa_env = dict(pair.split("=", 1) for pair in args.moa_env)
    pool = PromptPool()

    pooled: dict[tuple[str, int], list[tuple[list[dict[str, Any]], float]]] = {}
    scenario: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="moa-vs-vllm-") as tmp:
        servers = start_servers(args.servers, Path(tmp), args.vllm_venv, vllm_env, moa_env, shlex.split(args.moa_args))
        try:
            idle = idle_cpu_shares(servers)
            print(f"idle CPU use (share of one CPU): {idle}", flush=True)
            if any(share > 0.05 for share in idle.values()):
                print("WARNING: a server uses CPU while idle; it slows the others' measurements.")
            for round_number in range(args.rounds):
                for clients in args.clients:
                    requests = pool.take(per_config(clients))
                    for server in servers:
                        before = {s.name: group_cpu_seconds(s.pid) for s in servers if s is not server}
                        answers, seconds = drive_streamed(server.base_url, requests, clients, args.max_tokens,
                                                          min_tokens)
                        pooled.setdefault((server.name, clients), []).append((answers, seconds))
                        others = [(group_cpu_seconds(s.pid) - before[s.name]) / seconds for s in servers
                                  if s is not server]  # idle servers should use next to nothing meanwhile
                        idle[f"others_max_during_{server.name}_{clients}"] = round(max(others, default=0.0), 3)
                        row = summarize(answers, seconds)
                        print(f"round {round_number} {server.name:<9} {clients:>2} clients "
                              f"{row['tokens_per_s']:>7.1f} tok/s  p50 {row['latency_p50_s']:.2f} s  "
                              f"ttft p50 {row['ttft_p50_s']:.3f} s  itl p99 {row['itl_p99_s']}", flush=True)
                rows_requests, long_text = pool.take(args.rows), long_prompt_text(args.long_prompt_tokens, round_number)
                for server in servers:
                    result = long_prompt_scenario(server.base_url, rows_requests, long_text, args.decode_tokens)
                    scenario.setdefault(server.name, []).append(result)
                    print(f"round {round_number} {server.name:<9} long prompt: {result}", flush=True)
        finally:
            for server in reversed(servers):
                server.__exit__(None, None, None)
    write(args, pooled, scenario, [s.name for s in servers], idle)


def write(args: argparse.Namespace, pooled: dict[tuple[str, int], list[tuple[list[dict[str, Any]], float]]],
          scenario: dict[str, list[dict[str, Any]]], names: list[str], idle: dict[str, float]) -> None:
    """Pool the rounds, compare with vLLM, print the ratios and write the JSON."""
    rows = []
    for (name, clients), runs in pooled.items():
        answers = [a for run, _ in runs for a in run]
        row = {"server": name, "clients": clients, **summarize(answers, sum(s for _, s in runs))}
        if "vllm" in names:
            theirs = [a for run, _ in pooled[("vllm", clients)] for a in run]
            row["equal_to_vllm"] = sum(a["text"] == b["text"] for a, b in zip(answers, theirs, strict=True))
        rows.append(row)
    by = {(r["server"], r["clients"]): r for r in rows}
    ratios: dict[str, float] = {}
    for (name, clients), row in by.items():
        peer = by.get(("vllm", clients))
        if name == "vllm" or peer is None:
            continue
        for metric in ("tokens_per_s", "latency_p50_s", "ttft_p50_s", "itl_p99_s"):
            if row[metric] and peer[metric]:
                ratios[f"{name}_over_vllm_{metric}_{clients}"] = round(row[metric] / peer[metric], 3)
    long_prompt = {}
    for name, runs in scenario.items():  # the median over rounds
        long_prompt[name] = {key: statistics.median(values) if (values := [r[key] for r in runs if r[key] is not None])
                             else None for key in ("long_prompt_ttft_s", "steady_step_p50_s", "window_itl_p99_s",
                                                   "window_p99_over_steady_p50")}
    for name, summary in long_prompt.items():
        peer = long_prompt.get("vllm")
        if name != "vllm" and peer and summary["window_itl_p99_s"] and peer["window_itl_p99_s"]:
            ratios[f"{name}_over_vllm_long_prompt_window_itl_p99"] = round(
                summary["window_itl_p99_s"] / peer["window_itl_p99_s"], 3)
    print("ratios:", json.dumps(ratios, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "servers": names, "clients": args.clients, "rounds": args.rounds, "max_tokens": args.max_tokens,
        "fixed_length": args.fixed_length, "quick": args.quick, "vllm_env": args.vllm_env,
        "moa_env": args.moa_env,
        "moa_args": args.moa_args,
        "machine": platform.platform(), "cpus": os.cpu_count(), "idle_cpu_share": idle, "rows": rows,
        "ratios": ratios, "long_prompt": long_prompt, "long_prompt_rounds": scenario}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
