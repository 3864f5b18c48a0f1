"""Drives :mod:`tests.crash.worker`: start the fork server, run a save, kill it at a chosen moment."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Outcome:
    """How a worker ended: killed by ``signal``, or exited with ``exit``; ``stages`` it logged, in order."""

    signal: int | None
    exit: int | None
    stages: list[str]
    times: list[float]

    @property
    def duration(self) -> float:
        """Seconds from its ``begin`` stage to its last stage."""
        begin = self.stages.index("begin")
        return self.times[-1] - self.times[begin]

    @property
    def last_stage(self) -> str:
        """The last stage reached, without chunk numbers (``write adapter_model.safetensors``)."""
        if not self.stages:
            return "(none)"
        words = self.stages[-1].split()
        return " ".join(w for w in words if "/" not in w)


class ForkServer:
    """One ``python -m tests.crash.worker`` process; every save runs in a worker it forks."""

    def __init__(self, scratch: Path, timeout_s: float = 120.0):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.scratch = scratch
        self.log = open(scratch / "worker-stderr.log", "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen([sys.executable, "-m", "tests.crash.worker", str(scratch)], cwd=ROOT,
                                        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.runs = 0
        assert self._read(timeout_s).get("ready"), "the crash worker did not start"

    def _read(self, timeout_s: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        line = self.process.stdout.readline() if ready else b""
        if not line:
            raise AssertionError(f"the crash worker ended, or said nothing for {timeout_s} s: {self.stderr()[-3000:]}")
        return json.loads(line)

    def stderr(self) -> str:
        self.log.flush()
        return (self.scratch / "worker-stderr.log").read_text(errors="replace")

    def start(self, op: str, target: Path, variant: str, slow: float = 0.0) -> tuple[int, Path]:
        """Fork a worker running ``op`` (writing ``variant`` into ``target``); its pid and stage log."""
        self.runs += 1
        stages = self.scratch / f"stages-{self.runs}.log"
        command = {"op": op, "target": str(target), "variant": variant, "slow": slow, "stages": str(stages)}
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        self.process.stdin.flush()
        return int(self._read(30)["pid"]), stages

    def finish(self, stages: Path, timeout_s: float = 120.0) -> Outcome:
        """Wait for the current worker to end."""
        answer = self._read(timeout_s)
        lines = [line.split(" ", 1) for line in (stages.read_text().splitlines() if stages.exists() else [])]
        return Outcome(answer["signal"], answer["exit"], [name for _, name in lines], [float(t) for t, _ in lines])

    def run(self, op: str, target: Path, variant: str, slow: float = 0.0, timeout_s: float = 120.0) -> Outcome:
        """Run ``op`` to its end; fail the test if it did not succeed."""
        _, stages = self.start(op, target, variant, slow)
        outcome = self.finish(stages, timeout_s)
        assert outcome.exit == 0, f"{op} ({variant}) failed: {self.stderr()[-3000:]}"
        return outcome

    def run_and_kill(self, op: str, target: Path, variant: str, slow: float, delay_s: float,
                     wait_for: str | tuple[str, ...] = "begin") -> Outcome:
        """Start ``op``, wait until it logs a stage starting with ``wait_for`` (one of them), wait ``delay_s``
        more, then SIGKILL it."""
        pid, stages = self.start(op, target, variant, slow)
        deadline = time.monotonic() + 60

        def reached() -> bool:
            lines = stages.read_text().splitlines() if stages.exists() else []
            return any(line.split(" ", 1)[1].startswith(wait_for) for line in lines)

        while not reached():
            assert time.monotonic() < deadline, f"{op} never reached {wait_for!r}: {self.stderr()[-3000:]}"
            time.sleep(0.002)
        time.sleep(delay_s)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it had finished
        return self.finish(stages)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log.close()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every visible file under ``folder`` (relative name -> bytes); empty when the folder does not exist.

    Hidden names (``.x``) are left out: they are the temporary copies a killed save may leave,
    checked apart (:func:`leftovers`).
    """
    if not folder.exists():
        return {}
    files = (p for p in sorted(folder.rglob("*")) if p.is_file())
    return {str(p.relative_to(folder)): p.read_bytes() for p in files
            if not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def leftovers(target: Path) -> list[str]:
    """Temporary siblings of ``target`` (``.<name>.*``) that a save left behind."""
    if not target.parent.exists():
        return []
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))
