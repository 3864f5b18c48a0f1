"""moa.testing.fixtures: the helpers, and the fixtures as a pytest plugin in a standalone package layout."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from moa.hookspecs import hookimpl
from moa.plugin import get_plugin_manager, get_router
from moa.plugin.records import RouterSpec
from moa.routing import FixedRouter
from moa.testing import (
    TINY_CONFIG,
    fresh_plugin_manager,
    make_tiny_model,
    make_tiny_tokenizer,
    random_input_ids,
    require_plugin,
)


def test_tiny_model_and_tokenizer_agree():
    tokenizer = make_tiny_tokenizer()
    assert len(tokenizer) == TINY_CONFIG["vocab_size"]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (256, 257)
    assert tokenizer.decode(tokenizer("héllo, SELECT")["input_ids"]) == "héllo, SELECT"
    model = make_tiny_model()
    ids = random_input_ids(2, 3)
    with torch.no_grad():
        assert model(ids).logits.shape == (2, 3, TINY_CONFIG["vocab_size"])


class EchoRouter(FixedRouter):
    name = "echo_for_test"


def test_fresh_plugin_manager_registers_then_forgets_the_plugin():
    plugin = types.SimpleNamespace(moa_routers=hookimpl(lambda: [RouterSpec("echo_for_test", EchoRouter)]))
    with fresh_plugin_manager([plugin]) as manager:
        assert manager is get_plugin_manager()
        assert get_router("echo_for_test") is EchoRouter
    with pytest.raises(KeyError):
        get_router("echo_for_test")


def test_require_plugin_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        require_plugin("moa-no-such-plugin", "moa_no_such_plugin")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="pip install"):
        require_plugin("moa-no-such-plugin", "moa_no_such_plugin")


def test_fixtures_work_as_a_pytest_plugin_in_a_standalone_package(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.pytest.ini_options]\ntestpaths = ["tests"]\n')
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "conftest.py").write_text(textwrap.dedent('''
        import pytest
        pytest_plugins = ["moa.testing.fixtures"]

        @pytest.fixture
        def moa_plugin_modules():
            import plugin_under_test
            return [plugin_under_test]
    '''))
    (tests / "plugin_under_test.py").write_text(textwrap.dedent('''
        from moa.hookspecs import hookimpl
        from moa.plugin.records import RouterSpec
        from moa.routing import FixedRouter

        class StandaloneRouter(FixedRouter):
            name = "standalone"

        @hookimpl
        def moa_routers():
            return [RouterSpec(name="standalone", router_class=StandaloneRouter)]
    '''))
    (tests / "test_standalone.py").write_text(textwrap.dedent('''
        import torch
        import moa

        def test_fixtures(moa_tiny_model, moa_input_ids, moa_plugin_manager):
            assert moa_plugin_manager.get_router("standalone").__name__ == "StandaloneRouter"
            assert moa.get_router("standalone").__name__ == "StandaloneRouter"
            moa_tiny_model.add_adapter("a", moa.LoraConfig(r=2, target_modules=["q_proj"]))
            with torch.no_grad():
                out = moa_tiny_model(moa_input_ids, adapter_names=["a"] * len(moa_input_ids))
            assert out.logits.shape[:2] == moa_input_ids.shape
    '''))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOA_DISABLE", "PYTEST_ADDOPTS"))}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], check=False, cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
