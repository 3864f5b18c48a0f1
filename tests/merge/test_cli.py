"""``moa merge`` on the command line."""

from __future__ import annotations

import pytest
import torch

import moa
from moa.cli import main


@pytest.fixture(autouse=True)
def only_the_merge_command(monkeypatch):
    """Build the parser from this command alone, independent of the other commands' modules."""
    monkeypatch.setattr("moa.cli.COMMAND_MODULES", ("moa.commands.merge",))


@pytest.fixture(scope="module")
def folders(tiny_base_dir, tmp_path_factory):
    """Two adapters of the tiny base saved as PEFT folders."""
    model = moa.MixtureModel.from_pretrained(tiny_base_dir, quantization=None)
    root = tmp_path_factory.mktemp("cli-adapters")
    for name, seed in (("code", 1), ("math", 2)):
        torch.manual_seed(seed)
        model.add_adapter(name, moa.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
        model.save_adapter(name, root / name)
    return {"code": root / "code", "math": root / "math"}


def reference_logits(tiny_base_dir, folders, mixture, input_ids):
    model = moa.MixtureModel.from_pretrained(tiny_base_dir, quantization=None)
    for name, path in folders.items():
        model.load_adapter(path, adapter_name=name)
    with torch.no_grad():
        return model(input_ids, adapter_weights=mixture).logits


def test_merge_to_an_adapter_folder(tiny_base_dir, folders, tmp_path, input_ids, capsys):
    out = tmp_path / "merged"
    code = main(["merge", f"code={folders['code']}", f"math={folders['math']}", "--base", str(tiny_base_dir),
                 "--weights", "0.6", "0.4", "--strategy", "cat", "--out", str(out)])
    assert code == 0
    assert "into adapter 'merged' (rank 8)" in capsys.readouterr().out
    model = moa.MixtureModel.from_pretrained(tiny_base_dir, quantization=None)
    model.load_adapter(out, adapter_name="merged")
    with torch.no_grad():
        got = model(input_ids).logits
    expected = reference_logits(tiny_base_dir, folders, {"code": 0.6, "math": 0.4}, input_ids)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_merge_into_base_saves_a_dense_model(tiny_base_dir, folders, tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dense"
    code = main(["merge", f"code={folders['code']}", f"math={folders['math']}", "--base", str(tiny_base_dir),
                 "--into-base", "--dtype", "fp32", "--out", str(out)])
    assert code == 0
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids).logits
    expected = reference_logits(tiny_base_dir, folders, {"code": 0.5, "math": 0.5}, input_ids)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["code"], "is not NAME=PATH"),
        (["code=A", "code=B"], "must be distinct"),
        (["code=A", "math=B", "--weights", "1"], "--weights has 1 values but 2 adapters"),
    ],
)
def test_bad_arguments_give_one_clear_line(args, message, tmp_path, capsys):
    assert main(["merge", *args, "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moa merge: error:") and message in err


def test_unknown_strategy_lists_the_registered_ones(tiny_base_dir, folders, tmp_path, capsys):
    code = main(["merge", f"code={folders['code']}", "--base", str(tiny_base_dir), "--strategy", "tie",
                 "--out", str(tmp_path / "x")])
    assert code == 1
    err = capsys.readouterr().err
    assert "Unknown merge strategy 'tie'" in err and "ties_svd" in err
    assert not (tmp_path / "x").exists()
