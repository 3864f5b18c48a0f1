"""The process the crash tests kill: a fork server that runs one save per forked worker.

Started once per test module (``python -m tests.crash.worker``), it imports torch and moa and
builds the tiny model once, then for every JSON command on stdin forks a worker that runs
one operation (:data:`OPERATIONS`) and answers ``{"pid": ...}`` at once, then
``{"pid": ..., "status": ...}`` when the worker ends (killed or done). Forking keeps each
kill cheap (no re-import), so a test can kill a save many times within seconds.

With ``slow`` > 0 the worker writes slowly and logs its progress (``stages``): each
safetensors file in chunks with a pause between, and a pause before every ``fsync``,
``mkdir``, ``rename``/swap and ``rmtree``, each logged as a stage. A kill then lands in
the middle of a write, and the test knows where.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # forking after an OpenMP pool started is unsafe
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

import moa  # noqa: E402
from moa.testing.fixtures import make_tiny_model, save_tiny_base  # noqa: E402

CHUNKS = 8  # a safetensors file is written in this many pieces


class Tracer:
    """Slows the file system calls a save makes and logs each as a stage (in the worker only)."""

    def __init__(self, stages: str, slow: float):
        self.fd = os.open(stages, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.slow = slow

    def stage(self, name: str) -> None:
        os.write(self.fd, f"{time.monotonic():.4f} {name}\n".encode())

    def install(self) -> None:
        import shutil

        import safetensors.torch

        import moa.atomic

        def slowed(name: str, original: Any, label: Any) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                self.stage(label(*args))
                time.sleep(self.slow)
                return original(*args, **kwargs)
            return call

        base = os.path.basename
        os.fsync = slowed("fsync", os.fsync, lambda fd: "fsync")
        os.mkdir = slowed("mkdir", os.mkdir, lambda path, *a: f"mkdir {base(path)}")
        os.replace = slowed("replace", os.replace, lambda a, b: f"rename {base(os.fspath(b))}")
        shutil.rmtree = slowed("rmtree", shutil.rmtree, lambda path, *a, **k: "rmtree")
        moa.atomic.exchange_paths = slowed("exchange", moa.atomic.exchange_paths, lambda a, b: "swap")
        real_serialize = safetensors.torch.serialize_file

        def serialize_file(tensors: Any, filename: str, metadata: Any = None) -> None:
            scratch = f"/dev/shm/moa-crash-{os.getpid()}.safetensors"
            real_serialize(tensors, scratch, metadata=metadata)
            data = Path(scratch).read_bytes()
            os.unlink(scratch)
            step = max(1, -(-len(data) // CHUNKS))
            with open(filename, "wb") as handle:
                for k in range(0, len(data), step):
                    self.stage(f"write {base(filename)} {k // step + 1}/{CHUNKS}")
                    handle.write(data[k:k + step])
                    handle.flush()
                    time.sleep(self.slow)

        safetensors.torch.serialize_file = serialize_file


class State:
    """What the operations share, built once before any fork."""

    def __init__(self, scratch: Path):
        self.base_dir = save_tiny_base(scratch / "tiny-base")
        self.model = make_tiny_model(self.base_dir)
        for name, seed in (("old", 1), ("new", 2)):
            torch.manual_seed(seed)
            self.model.add_adapter(name, moa.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False))
        self.scratch = scratch


def op_adapter(state: State, target: str, variant: str, tracer: Tracer) -> None:
    tracer.stage("begin")
    state.model.save_adapter(variant, target)


def op_router(state: State, target: str, variant: str, tracer: Tracer) -> None:
    from moa.routing.learned_gate import LearnedGate

    torch.manual_seed(1 if variant == "old" else 2)
    gate = LearnedGate(["old", "new"], hidden_size=64, hidden_layer=1, mlp_hidden=512)
    tracer.stage("begin")
    gate.save(target)


def op_merged(state: State, target: str, variant: str, tracer: Tracer) -> None:
    from moa.merge.adapters import merge_adapters

    weights = [0.5, 0.5] if variant == "old" else [0.2, 0.8]
    merge_adapters(state.model, ["old", "new"], weights, strategy="linear", new_name="merged")
    tracer.stage("begin")
    state.model.save_adapter("merged", target)


def op_registry(state: State, target: str, variant: str, tracer: Tracer) -> None:
    from moa.hub.registry import sync_shipped_entries

    manifest = Path(moa.__file__).resolve().parent / "demo_adapters" / "manifest.json"
    if variant == "old":  # the same adapters, as an older manifest described them
        data = json.loads(manifest.read_text())
        data["base_fingerprint"] = "0" * len(data["base_fingerprint"])
        manifest = state.scratch / "old-manifest.json"
        manifest.write_text(json.dumps(data))
    tracer.stage("begin")
    sync_shipped_entries(target, manifest=manifest)


class _StageHandler(logging.Handler):
    def __init__(self, tracer: Tracer):
        super().__init__(logging.DEBUG)
        self.tracer = tracer

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("default base conversion: "):
            self.tracer.stage("step " + message.split(": ", 1)[1])


def op_base(state: State, target: str, variant: str, tracer: Tracer) -> None:
    from moa.model.default_base import default_base_path

    os.environ["MOA_HOME"] = target
    conversion = logging.getLogger("moa.model.default_base")
    conversion.setLevel(logging.DEBUG)
    conversion.addHandler(_StageHandler(tracer))  # its steps ("load GGUF weights", ...) become stages
    tracer.stage("begin")
    default_base_path(progress=False)


OPERATIONS = {"adapter": op_adapter, "router": op_router, "merged": op_merged, "registry": op_registry,
              "base": op_base}


def run_worker(state: State, command: dict[str, Any]) -> None:
    """In the forked worker: run one operation, then leave without cleanup (``os._exit``)."""
    code = 0
    try:
        tracer = Tracer(command["stages"], float(command.get("slow", 0)))
        if tracer.slow > 0:
            tracer.install()
        OPERATIONS[command["op"]](state, command["target"], command["variant"], tracer)
        tracer.stage("end")
    except BaseException:  # noqa: BLE001 - report anything, the parent decides
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    scratch = Path(sys.argv[1])
    state = State(scratch)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_worker(state, command)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                          "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)


if __name__ == "__main__":
    main()
