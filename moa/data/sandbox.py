"""Run a candidate Python function against test cases in a separate, limited process.

Candidates are never executed in the calling process: :func:`passes_tests` starts
``python -I -S`` (isolated mode: no ``PYTHON*`` variables, no cwd on the path; no
``site``, so only the standard library is importable) in an empty temporary directory, feeds it the candidate and the cases on stdin, caps its
address space, CPU time and file sizes where the platform allows (``resource``), and kills
it at the wall-clock timeout. A run passes only if the process prints the per-run nonce
that the harness writes after the last case, so a candidate that exits early fails.

This stops accidents (infinite loops, exceptions, runaway memory), not a determined
attacker: it is not a security sandbox.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
"""Wall-clock limit of one candidate run (interpreter start-up included)."""

MEMORY_LIMIT_BYTES = 1 << 30

_HARNESS = r"""
import json, sys
try:
    import resource
    cpu = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
except (ImportError, ValueError, OSError):
    pass
_job = json.loads(sys.stdin.read())
_nonce = _job.pop("nonce")
_ns = {"__name__": "candidate"}
exec(compile(_job["code"], "<candidate>", "exec"), _ns)
_fn = _ns[_job["entry_point"]]
for _args, _want in _job["tests"]:
    _got = _fn(*_args) if _job["spread"] else _fn(_args)
    if _got != _want or type(_got) is not type(_want) and not (isinstance(_got, int) and isinstance(_want, int)):
        sys.exit(3)
sys.stdout.write(_nonce)
"""


def _child_env() -> dict[str, str]:
    """A minimal environment for the child (Windows needs ``SYSTEMROOT`` to start Python)."""
    env = {"PATH": os.defpath, "PYTHONIOENCODING": "utf-8"}
    if "SYSTEMROOT" in os.environ:
        env["SYSTEMROOT"] = os.environ["SYSTEMROOT"]
    return env


def passes_tests(
    code: str,
    entry_point: str,
    tests: list[list[Any]],
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    spread_args: bool = False,
) -> bool:
    """Whether ``code`` defines ``entry_point`` returning the expected output of every case.

    Args:
        code: Python source of the candidate (module level, defines the function).
        entry_point: Name of the function to call.
        tests: ``[input, expected_output]`` pairs (JSON values). The input is passed as the
            single argument, or spread as positional arguments if ``spread_args``.
        timeout: Seconds before the process is killed (then the candidate fails).
        spread_args: Call ``fn(*input)`` instead of ``fn(input)``.

    Returns:
        ``True`` only if the process ran every case, matched every output (same type, ints
        and bools aside) and exited cleanly in time.
    """
    nonce = secrets.token_hex(16)
    job = {"code": code, "entry_point": entry_point, "tests": tests, "spread": spread_args, "nonce": nonce}
    cpu_limit = str(max(1, int(timeout) + 1))
    with tempfile.TemporaryDirectory(prefix="moa-sandbox-") as workdir:
        try:
            proc = subprocess.run(
                [sys.executable, "-I", "-S", "-c", _HARNESS, cpu_limit, str(MEMORY_LIMIT_BYTES)],
                input=json.dumps(job),
                check=False,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=workdir,
                env=_child_env(),
            )
        except subprocess.TimeoutExpired:
            logger.debug("candidate timed out after %.1f s", timeout)
            return False
        except OSError as exc:  # could not start the interpreter at all
            logger.warning("could not run the code sandbox: %s", exc)
            return False
    return proc.returncode == 0 and proc.stdout.endswith(nonce)
