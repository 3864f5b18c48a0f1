"""The server's request validation against hostile input: bad adapter names, enormous max_tokens."""

from __future__ import annotations

import pytest

from tests.serve.conftest import serving_stack

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with serving_stack(tmp_path_factory.mktemp("hostile-serve"), router=False, allow_runtime_loading=True,
                       ranks={"sql": 2}) as live:
        yield live


@pytest.mark.parametrize("name", ["../x", "a/b", "sql\n", "\u0455ql", "sql\u202e", ""], ids=repr)
def test_load_lora_adapter_refuses_a_bad_name_before_touching_its_source(stack, monkeypatch, name):
    import moa.serve.adapter_cache as adapter_cache

    monkeypatch.setattr(adapter_cache, "resolve_source", lambda *a, **k: pytest.fail("the source was resolved"))
    status, _, raw = stack.http("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": "alice/evil"})
    assert status == 400, raw
    assert b"AdapterNameError" in raw and b"adapter name" in raw
    assert stack.model.adapter_names == ["sql"]


@pytest.mark.parametrize("max_tokens", [10**12, 2**31, 300])
def test_enormous_max_tokens_is_400(stack, max_tokens):
    status, _, raw = stack.http("POST", "/v1/completions", {"model": "sql", "prompt": "x", "max_tokens": max_tokens})
    assert status == 400, raw
    assert b"max_tokens" in raw
