"""`moa train-adapter` under DDP (2 CPU processes, gloo) equals one process; FSDP on CPU is refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file

from moa.cli import main as moa_main
from moa.testing.fixtures import load_tiny_base
from moa.train.sft import METRICS_NAME
from tests.train.helpers import toy_examples

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(base_dir, data: Path, out: Path, batch_size: int) -> list[str]:
    return ["train-adapter", "--base", str(base_dir), "--quantization", "none", "--train-file", str(data),
            "--steps", "3", "--rank", "4", "--batch-size", str(batch_size), "--first-layer", "0", "--dropout", "0",
            "--lr", "1e-2", "--dev-limit", "0", "--quiet", "--out", str(out)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MOA_KERNEL_BACKEND": "torch", "ACCELERATE_USE_CPU": "true",
            "PYTHONPATH": str(REPO)}


def test_ddp_two_cpu_processes_equal_one_process_and_load_in_peft(tiny_base_dir, tmp_path):
    """torch.distributed.run (what ``accelerate launch`` runs), gloo, 2 ranks x batch 2 == 1 process x batch 4."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n" for e in toy_examples(8)))
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "moa.cli", *_args(tiny_base_dir, data, ddp, batch_size=2)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((ddp / METRICS_NAME).read_text())
    assert metrics["processes"] == 2 and metrics["global_batch"] == 4 and metrics["steps"] == 3
    digests = metrics["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]

    assert moa_main(_args(tiny_base_dir, data, single, batch_size=4)) == 0
    one = json.loads((single / METRICS_NAME).read_text())
    # each rank read its own half of every global batch, and the loss is the mean over all 4 examples' tokens
    assert metrics["tokens_per_process"] < one["tokens_per_process"]
    torch.testing.assert_close(torch.tensor(metrics["loss_curve"]), torch.tensor(one["loss_curve"]),
                               rtol=1e-4, atol=1e-4)
    a, b = load_file(ddp / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(".lora_" in k for k in a)  # only the adapter is saved
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-3, atol=2e-3)  # fp16 on disk

    ids = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [peft.PeftModel.from_pretrained(load_tiny_base(tiny_base_dir), folder).eval()(ids).logits
                  for folder in (ddp, single)]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-3, atol=1e-3)


def test_fsdp_on_cpu_is_refused_by_accelerate(tiny_base_dir, tmp_path):
    """accelerate's FSDP plugin needs a CUDA/XPU/... device; examples/accelerate_fsdp.yaml is the GPU recipe."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n" for e in toy_examples(2)))
    if torch.cuda.is_available():
        import pytest

        pytest.skip("with CUDA, FSDP runs: see docs/training.md")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "examples/accelerate_fsdp.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "moa.cli",
           *_args(tiny_base_dir, data, tmp_path / "fsdp", batch_size=2)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode != 0 and not (tmp_path / "fsdp").exists()
    # accelerate words the refusal by where it stops: no accelerator found, or FSDP's CPU check
    refusals = ("There are currently no available devices found, must be one of 'XPU', 'CUDA'",
                "FSDP parameter initialization with `sync_module_states=True` is not supported on cpu")
    assert any(refusal in proc.stderr for refusal in refusals), proc.stderr[-2000:]


#: What transformers' Trainer fills in a DeepSpeed config from its own arguments.
TRAINER_AUTO_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                     "gradient_clipping", "bf16.enabled", "fp16.enabled", "zero_optimization.reduce_bucket_size",
                     "zero_optimization.stage3_prefetch_bucket_size",
                     "zero_optimization.stage3_param_persistence_threshold"}


def _auto_keys(config: dict, prefix: str = "") -> set[str]:
    found = set()
    for key, value in config.items():
        if isinstance(value, dict):
            found |= _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            found.add(prefix + key)
    return found


def test_deepspeed_configs_leave_to_trainer_only_what_it_fills(tmp_path):
    """GPU-only (deepspeed is not installed here): the JSON is valid and every "auto" is one Trainer resolves."""
    for stage in (2, 3):
        config = json.loads((REPO / f"examples/deepspeed_zero{stage}.json").read_text())
        assert config["zero_optimization"]["stage"] == stage
        assert _auto_keys(config) <= TRAINER_AUTO_KEYS
        launcher = (REPO / f"examples/accelerate_deepspeed_zero{stage}.yaml").read_text()
        assert f"deepspeed_config_file: examples/deepspeed_zero{stage}.json" in launcher
    assert json.loads((REPO / "examples/deepspeed_zero3.json").read_text())["zero_optimization"][
        "stage3_gather_16bit_weights_on_model_save"] is True  # rank 0 can save the adapter
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    for stage in (2, 3):
        ds = HfTrainerDeepSpeedConfig(json.loads((REPO / f"examples/deepspeed_zero{stage}.json").read_text()))
        ds.trainer_config_process(TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                                    gradient_accumulation_steps=2, report_to="none"))
        assert ds.config["gradient_accumulation_steps"] == 2
