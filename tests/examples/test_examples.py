"""Every example script runs and its own checks pass (on the tiny base: fast)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_per_row_adapters(tiny_base_dir, quantization):
    out = run("per_row_adapters.py", "--base", str(tiny_base_dir), "--quantization", quantization)
    assert "every row of the mixed batch equals the row alone" in out


def test_weighted_mixture(tiny_base_dir):
    out = run("weighted_mixture.py", "--base", str(tiny_base_dir), "--quantization", "none")
    assert out.count("same as alone (same padding): True") == 3


def test_peft_interop(tiny_base_dir):
    out = run("peft_interop.py", "--base", str(tiny_base_dir))
    assert "PEFT -> moa" in out and "moa -> PEFT" in out


@pytest.mark.integration
def test_per_row_adapters_on_the_default_base_in_nf4():
    out = run("per_row_adapters.py")
    assert "every row of the mixed batch equals the row alone" in out
