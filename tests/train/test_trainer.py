"""Adapter SFT on transformers.Trainer: parity with the old loop, accumulation, resume, options."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moa.cli import main as moa_main
from moa.train.sft import SFTConfig, adapter_parameters, add_training_adapter, checkpoint_folder, train_adapter
from moa.train.trainer import TRAINABLE_NAME, check_optimizer
from tests.train.helpers import load_tiny, toy_examples

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[2]


def _run(base_dir, config: SFTConfig, **kwargs):
    model = load_tiny(base_dir)
    add_training_adapter(model, "toy", rank=4, first_layer=0, dropout=kwargs.pop("dropout", 0.0))
    result = train_adapter(model, "toy", toy_examples(8), config, progress=False, **kwargs)
    return result.metrics, [p.detach().clone() for p in adapter_parameters(model, "toy")]


def test_first_20_losses_match_the_hand_written_loop(tiny_base_dir):
    """The reference was recorded from the accelerate loop this replaces (same data order, schedule, clipping)."""
    ref = json.loads((DATA / "old_loop_losses.json").read_text())
    model = load_tiny(tiny_base_dir)
    add_training_adapter(model, ref["adapter_name"], **ref["adapter"])
    result = train_adapter(model, ref["adapter_name"], toy_examples(8), SFTConfig(**ref["config"]), progress=False)
    new = result.metrics["loss_curve"][:20]
    assert len(new) == 20
    for step, (a, b) in enumerate(zip(new, ref["losses"], strict=True)):
        assert abs(a - b) <= 1e-4 * abs(b), (step, a, b)
    weights = sum(float(p.abs().sum()) for p in adapter_parameters(model, ref["adapter_name"]))
    assert weights == pytest.approx(ref["final_weight_abs_sum"], rel=1e-4)


def test_accumulation_4x2_equals_batch_8_and_checkpointing_changes_nothing(tiny_base_dir):
    common = {"steps": 4, "lr": 1e-2, "warmup_steps": 1, "dev_limit": 0}
    m8, w8 = _run(tiny_base_dir, SFTConfig(batch_size=8, **common))
    m2, w2 = _run(tiny_base_dir, SFTConfig(batch_size=2, gradient_accumulation_steps=4, **common))
    mc, wc = _run(tiny_base_dir, SFTConfig(batch_size=2, gradient_accumulation_steps=4, gradient_checkpointing=True,
                                           **common))
    assert m2["global_batch"] == m8["global_batch"] == 8
    for metrics in (m2, mc):
        torch.testing.assert_close(torch.tensor(metrics["loss_curve"]), torch.tensor(m8["loss_curve"]),
                                   rtol=1e-5, atol=1e-5)
    for weights in (w2, wc):
        for a, b in zip(weights, w8, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert m8["loss_curve"][-1] < m8["loss_curve"][0]


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
from transformers import TrainerCallback
from moa.train.sft import SFTConfig, add_training_adapter, train_adapter
from tests.train.helpers import load_tiny, toy_examples

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)

torch.set_num_threads(1)
model = load_tiny({base!r})
add_training_adapter(model, "toy", rank=4, first_layer=0, dropout=0.1)
train_adapter(model, "toy", toy_examples(8), SFTConfig(**{config!r}), output_dir={out!r}, progress=False,
              callbacks=[Kill()])
"""


def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tiny_base_dir, tmp_path):
    """Killed at step 5 (checkpoints every 2 steps), resumed from checkpoint-4: the same adapter as one run.

    LoRA dropout is on (0.1), so this also checks that the RNG state comes back.
    """
    config = {"steps": 7, "batch_size": 2, "lr": 1e-2, "warmup_steps": 2, "dev_limit": 0, "save_steps": 2,
              "save_dtype": "float32"}
    killed_out = tmp_path / "killed"
    script = KILLED_RUN.format(repo=str(REPO), base=str(tiny_base_dir), config=config, out=str(killed_out), kill_at=5)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL
    checkpoints = checkpoint_folder(killed_out)
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("checkpoint-")) == \
        ["checkpoint-2", "checkpoint-4"]
    assert not killed_out.exists()
    saved = checkpoints / "checkpoint-4"
    assert {"adapter_model.safetensors", "adapter_config.json", TRAINABLE_NAME, "optimizer.pt", "scheduler.pt",
            "rng_state.pth", "trainer_state.json"} <= {p.name for p in saved.iterdir()}
    assert all(".adapters.toy." in k for k in load_file(saved / TRAINABLE_NAME))  # never the base

    resumed, _ = _run(tiny_base_dir, SFTConfig(**config), dropout=0.1, output_dir=killed_out, resume=True)
    assert resumed["resumed_from"].endswith("checkpoint-4") and len(resumed["loss_curve"]) == 3
    straight, _ = _run(tiny_base_dir, SFTConfig(**config), dropout=0.1, output_dir=tmp_path / "straight")
    a = load_file(killed_out / "adapter_model.safetensors")
    b = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert resumed["loss_curve"] == pytest.approx(straight["loss_curve"][4:], rel=1e-5)


def test_cli_resume_options_and_tensorboard(tiny_base_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n" for e in toy_examples(4)))
    args = ["train-adapter", "--base", str(tiny_base_dir), "--quantization", "none", "--train-file", str(data),
            "--rank", "4", "--batch-size", "2", "--gradient-accumulation-steps", "2", "--first-layer", "0",
            "--dev-limit", "0", "--save-steps", "2", "--report-to", "tensorboard", "--quiet", "--out",
            str(tmp_path / "a"), "--projections", "all-linear"]
    assert moa_main([*args, "--steps", "2"]) == 0
    assert moa_main([*args, "--steps", "3", "--resume"]) == 0  # continues from checkpoint-2
    metrics = json.loads((tmp_path / "a" / "train_metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-2") and len(metrics["loss_curve"]) == 1
    assert metrics["global_batch"] == 4 and metrics["config"]["gradient_accumulation_steps"] == 2
    assert metrics["recipe"]["projections"][-1] == "down_proj" and len(metrics["recipe"]["projections"]) == 7
    assert list((tmp_path / "a-checkpoints" / "runs").rglob("events.out.tfevents.*"))
    assert "trainable parameters" in capsys.readouterr().out


def test_paged_optimizers_are_refused_on_cpu_with_a_clear_error(tiny_base_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("paged optimizers run on CUDA")
    with pytest.raises(ValueError, match="needs CUDA"):
        check_optimizer("paged_adamw_8bit")
    with pytest.raises(SystemExit, match="paged_adamw_32bit needs CUDA"):
        moa_main(["train-adapter", "--base", str(tiny_base_dir), "--domain", "sql", "--optim", "paged_adamw_32bit",
                  "--out", str(tmp_path / "x")])
    check_optimizer("adamw_bnb_8bit")  # not paged: allowed


def test_trainable_parameter_report_is_logged(tiny_base_dir, caplog):
    with caplog.at_level(logging.INFO, logger="moa.train.trainer"):
        metrics, _ = _run(tiny_base_dir, SFTConfig(steps=1, batch_size=2, dev_limit=0))
    line = next(r.getMessage() for r in caplog.records if "trainable params" in r.getMessage())
    assert f"trainable params: {metrics['trainable_parameters']:,d}" in line and "trainable%" in line


def test_adamw_bnb_8bit_trains_on_cpu(tiny_base_dir):
    """bitsandbytes' 8-bit AdamW (not paged) runs on CPU through Trainer's --optim."""
    metrics, weights = _run(tiny_base_dir, SFTConfig(steps=2, batch_size=2, lr=1e-2, optim="adamw_bnb_8bit",
                                                     dev_limit=0))
    assert metrics["config"]["optim"] == "adamw_bnb_8bit" and len(metrics["loss_curve"]) == 2
    assert any(float(w.abs().sum()) > 0 for w in weights[1::2])  # lora_B moved off its zero init
