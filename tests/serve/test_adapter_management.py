"""Adapters while serving: vLLM's load/unload endpoints, LRU eviction under ``max_loras``,
just-in-time reloads, replacement without stale weights, 409/429/503, through the real
``openai`` client and engine (tests/serve/conftest.py: small_stack), plus AdapterCache rules."""

from __future__ import annotations

import shutil
import threading

import pytest

from tests.serve.conftest import engine_blocked, serving_stack, wait_until

openai = pytest.importorskip("openai")

PROMPT = "WHERE city ="


def complete(stack, model: str, **extra) -> str:
    response = stack.client().completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, **extra)
    assert response.model_extra["moa"]["routing"] == {model: 1.0}
    return response.choices[0].text


def load(stack, name: str, path: str) -> dict:
    return stack.client().post("/load_lora_adapter", body={"lora_name": name, "lora_path": path}, cast_to=object)


def unload(stack, name: str) -> dict:
    return stack.client().post("/unload_lora_adapter", body={"lora_name": name}, cast_to=object)


def resident_in_listing(stack) -> dict[str, bool]:
    return {m.id: m.model_extra["moa"]["resident"] for m in stack.client().models.list() if m.model_extra.get("moa")}


def test_auto_without_router_is_400(small_stack):
    with pytest.raises(openai.BadRequestError) as info:
        small_stack.client().completions.create(model="auto", prompt="x", max_tokens=1)
    assert "router" in info.value.body["message"]
    assert "auto" not in {m.id for m in small_stack.client().models.list()}


def test_lru_eviction_and_just_in_time_reload(small_stack):
    cache = small_stack.cache
    assert set(cache.resident()) == {"sql", "code"}
    assert resident_in_listing(small_stack) == {"sql": True, "code": True, "french": False, "icd": False}
    code_before = complete(small_stack, "code")
    complete(small_stack, "sql")  # code is now the least recently used
    evictions = cache.evictions
    complete(small_stack, "french")  # registered at start-up, loaded on demand
    assert set(cache.resident()) == {"sql", "french"} and cache.evictions == evictions + 1
    assert resident_in_listing(small_stack)["code"] is False
    assert complete(small_stack, "code") == code_before  # reloaded from its source, evicting sql (LRU)
    assert set(cache.resident()) == {"french", "code"}
    assert len(small_stack.model.adapter_names) == 2
    metrics = small_stack.http("GET", "/metrics")[2].decode()
    assert 'vllm:lora_requests_info{max_lora="2"' in metrics
    assert "moa_adapter_evictions " in metrics and 'moa_adapter_load_seconds{adapter="code"}' in metrics


def test_load_and_unload_endpoints(small_stack, tmp_path):
    answer = load(small_stack, "extra", str(small_stack.folders["icd"]))
    assert answer["status"] == "ok" and answer["load_seconds"] > 0
    assert small_stack.cache.record("extra").load_seconds == answer["load_seconds"]
    assert "extra" in {m.id for m in small_stack.client().models.list()}
    assert complete(small_stack, "extra") == complete(small_stack, "icd")
    assert unload(small_stack, "extra")["status"] == "ok"
    assert "extra" not in small_stack.model.adapter_names
    with pytest.raises(openai.NotFoundError):
        complete(small_stack, "extra")
    with pytest.raises(openai.NotFoundError):
        unload(small_stack, "ghost")
    with pytest.raises(openai.BadRequestError) as info:
        load(small_stack, "broken", str(tmp_path / "missing"))
    assert "broken" not in small_stack.cache.registered()
    with pytest.raises(openai.BadRequestError):
        load(small_stack, "tiny-base", str(small_stack.folders["icd"]))
    with pytest.raises(openai.BadRequestError) as info:
        load(small_stack, "bad:name", str(small_stack.folders["icd"]))
    assert "name" in info.value.body["message"]


def test_reload_never_serves_stale_weights(small_stack, tmp_path):
    sql_text, code_text = complete(small_stack, "sql"), complete(small_stack, "code")
    assert sql_text != code_text, "the random adapters should answer differently"
    load(small_stack, "swap", str(small_stack.folders["sql"]))
    assert complete(small_stack, "swap") == sql_text
    load(small_stack, "swap", str(small_stack.folders["code"]))  # same name, new source: replaced
    assert complete(small_stack, "swap") == code_text
    # An evicted adapter comes back from its source as the source is NOW.
    mutable = tmp_path / "mutable"
    shutil.copytree(small_stack.folders["sql"], mutable)
    load(small_stack, "mut", str(mutable))
    assert complete(small_stack, "mut") == sql_text
    complete(small_stack, "sql"), complete(small_stack, "code")  # evicts swap, then mut (LRU)
    assert "mut" not in small_stack.cache.resident()
    shutil.rmtree(mutable)
    shutil.copytree(small_stack.folders["code"], mutable)
    assert complete(small_stack, "mut") == code_text
    for name in ("swap", "mut"):
        unload(small_stack, name)


def test_full_queue_is_429_and_in_use_adapter_is_409(small_stack):
    complete(small_stack, "sql")  # resident before the engine is blocked (a reload needs the engine)
    results: dict[str, object] = {}

    def waiting_request() -> None:
        try:
            results["text"] = complete(small_stack, "sql")
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            results["error"] = error

    with engine_blocked(small_stack.engine):
        thread = threading.Thread(target=waiting_request, daemon=True)
        thread.start()
        wait_until(lambda: small_stack.engine.stats()["queued"] == 1, what="one queued request")
        with pytest.raises(openai.RateLimitError) as info:
            small_stack.client().completions.create(model="sql", prompt="x", max_tokens=1)
        assert info.value.response.headers["retry-after"] == "1"
        assert info.value.body["type"] == "rate_limit_exceeded"
        with pytest.raises(openai.ConflictError) as conflict:
            unload(small_stack, "sql")
        assert "in use" in conflict.value.body["message"] or "use it" in conflict.value.body["message"]
        metrics = small_stack.http("GET", "/metrics")[2].decode()
        assert 'waiting_lora_adapters="sql"' in metrics and "moa_num_requests_waiting 1.0" in metrics
    thread.join(30)
    assert "error" not in results and isinstance(results.get("text"), str)
    assert "sql" in small_stack.cache.resident()


def test_dead_engine_is_503(tmp_path):
    with serving_stack(tmp_path, router=False, ranks={}) as stack:
        assert stack.http("GET", "/health")[0] == 200
        stack.engine.shutdown(timeout=5)
        assert stack.http("GET", "/health")[0] == 503
        with pytest.raises(openai.InternalServerError) as info:
            stack.client().completions.create(model="tiny-base", prompt="x", max_tokens=1)
        assert info.value.status_code == 503 and info.value.body["code"] == "engine_unavailable"


# -- AdapterCache rules (no HTTP) ------------------------------------------------------------


@pytest.fixture
def cache_and_folders(tmp_path):
    from moa.serve.adapter_cache import AdapterCache
    from moa.serve.engine import Engine
    from moa.testing.fixtures import make_tiny_model
    from tests.serve.conftest import make_adapter_folders

    folders = make_adapter_folders(tmp_path, {"a": 2, "b": 4, "c": 8})
    model = make_tiny_model()
    engine = Engine(model)  # not started: engine.call runs on the caller's thread
    cache = AdapterCache(engine, model, max_loras=2, allow_runtime_loading=False, pinned={"a"})
    return cache, folders


def test_cache_evicts_lru_but_never_pinned_or_leased(cache_and_folders):
    from moa.serve.requests import ConflictError, UnknownModelError

    cache, folders = cache_and_folders
    cache.load("a", str(folders["a"]), startup=True)
    cache.load("b", str(folders["b"]), startup=True)
    cache.touch(["b"])  # a is the LRU, but pinned
    with cache.lease(["b"]), pytest.raises(ConflictError, match="none can be evicted"):
        cache.load("c", str(folders["c"]))
    assert set(cache.model.adapter_names) == {"a", "b"}  # nothing changed
    record = cache.load("c", str(folders["c"]))  # runtime load: evicts b
    assert record.load_seconds > 0 and set(cache.resident()) == {"a", "c"}
    assert cache.known("b")  # evicted, given at start-up: comes back on demand
    cache.load("x", str(folders["b"]))  # evicts c, loaded at run time
    assert not cache.known("c")  # runtime loading is off: not reloadable
    with pytest.raises(UnknownModelError, match="not served"):
        cache.ensure(["c"])
    cache.ensure(["b"])
    assert set(cache.resident()) == {"a", "b"}


def test_cache_adopts_adapters_already_in_the_model(tmp_path):
    import moa
    from moa.serve.adapter_cache import AdapterCache
    from moa.serve.engine import Engine
    from moa.testing.fixtures import make_tiny_model

    model = make_tiny_model()
    model.add_adapter("own", moa.LoraConfig(r=2, target_modules=["q_proj"]))
    cache = AdapterCache(Engine(model), model, max_loras=1)
    assert cache.resident() == ["own"] and cache.record("own").source is None
    from moa.serve.requests import ConflictError

    with pytest.raises(ConflictError, match="without a known source"):
        cache.load("other", str(_folder_of(model, "own", tmp_path)))


def _folder_of(model, name, tmp_path):
    folder = tmp_path / name
    model.save_adapter(name, folder)
    return folder


def test_resolve_source_folder_registry_and_hub_revision(monkeypatch, tmp_path):
    from moa.eval.assets import shipped_adapters_dir
    from moa.serve import adapter_cache

    assert adapter_cache.resolve_source(str(tmp_path)) == tmp_path
    folder = adapter_cache.resolve_source("sql")  # a registry name: the shipped, verified folder
    assert (folder / "adapter_config.json").is_file()
    assert folder.resolve() == (shipped_adapters_dir() / "sql").resolve()
    calls = []
    monkeypatch.setattr("moa.hub.sources.resolve_adapter_folder",
                        lambda repo, revision=None, max_rank=None: calls.append((repo, revision)) or tmp_path)
    adapter_cache.resolve_source("alice/sql-lora@v2")
    adapter_cache.resolve_source("alice/sql-lora")
    assert calls == [("alice/sql-lora", "v2"), ("alice/sql-lora", None)]
