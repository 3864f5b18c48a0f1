"""``moa push``, ``moa pull`` and ``moa registry`` against the Hub test server."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from moa.cli import main
from moa.hub.verify import sha256_file
from tests.hub.conftest import add_lora, logits
from tests.hub.test_registry import adapter_toml, make_registry

peft = pytest.importorskip("peft")


def test_push_pull_and_pull_by_registry_name(hub, tiny_model, tiny_base_dir, input_ids, tmp_path, capsys,
                                             monkeypatch):
    add_lora(tiny_model, "sql", seed=31)
    tiny_model.save_adapter("sql", tmp_path / "sql")
    assert main(["push", str(tmp_path / "sql"), "alice/cli-sql", "--domain", "sql", "--metric", "acc=0.7",
                 "--message", "first", "-q"]) == 0
    out = capsys.readouterr().out
    commit = out.split("commit  ")[1].split()[0]
    files = {line.split()[2]: line.split()[1] for line in out.splitlines() if line.startswith("sha256")}
    assert len(commit) == 40 and set(files) >= {"adapter_config.json", "adapter_model.safetensors", "README.md"}

    assert main(["pull", "alice/cli-sql", "--out", str(tmp_path / "copy"), "--cache-dir", str(hub.cache_dir)]) == 0
    assert f"pulled adapter alice/cli-sql at commit {commit}" in capsys.readouterr().out
    assert not (tmp_path / "copy" / "adapter_model.safetensors").is_symlink()
    assert sha256_file(tmp_path / "copy" / "adapter_model.safetensors") == files["adapter_model.safetensors"]
    peft_model = peft.PeftModel.from_pretrained(  # PEFT loads what `moa push` published, same logits
        LlamaForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval(), "alice/cli-sql").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids).logits, logits(tiny_model, input_ids, "sql"),
                                   rtol=1e-5, atol=1e-5)

    root = make_registry(tmp_path, {"sql": adapter_toml("sql", "alice/cli-sql", commit, files,
                                                        tiny_model.base_fingerprint)})
    monkeypatch.setenv("MOA_REGISTRY", str(root))
    assert main(["pull", "sql", "-q"]) == 0
    assert "verified" in capsys.readouterr().out
    assert main(["registry", "list"]) == 0 and "alice/cli-sql@" in capsys.readouterr().out
    assert main(["registry", "verify", "-q"]) == 0
    assert "ok       adapter  sql" in capsys.readouterr().out
    assert main(["pull", "nope"]) == 1
    assert "Registered: sql" in capsys.readouterr().err


def test_pull_detects_mixtures_and_errors_are_one_line(hub, tiny_model, capsys):
    from moa.hub import push_mixture

    add_lora(tiny_model, "a", seed=32)
    push_mixture(tiny_model, "alice/cli-mix")
    assert main(["pull", "alice/cli-mix", "-q"]) == 0
    out = capsys.readouterr().out
    assert "pulled mixture alice/cli-mix" in out and "adapter a: alice/cli-mix-a@" in out
    assert main(["pull", "alice/missing"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moa pull: error:") and "no such repo" in err


@pytest.mark.parametrize("args", [["registry", "render", "--check"], ["registry", "list", "--kind", "plugins"]])
def test_registry_commands_on_the_shipped_registry(args, capsys):
    assert main(args) == 0
    assert capsys.readouterr().out
