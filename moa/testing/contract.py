"""Contract test suites every adapter type, router and plugin package must pass.

Subclass a contract in a test module (name it ``Test...``) and say what is under test;
pytest then runs every ``test_*`` method of the contract against it::

    from moa.testing import AdapterTypeContract, PluginInstallContract, RouterContract

    class TestIA3Contract(AdapterTypeContract):
        adapter_type = "ia3"
        config_kwargs = {"target_modules": ["k_proj", "v_proj", "down_proj"],
                         "feedforward_modules": ["down_proj"]}
        bad_config_kwargs = [{"target_modules": []}, {"fan_in_fan_out": True}]

    class TestKeywordRouterContract(RouterContract):
        router_name = "keyword"

        @pytest.fixture
        def router(self):
            return KeywordRouter([(r"sql", {"alpha": 1.0})], default={"beta": 1.0})

    class TestInstalled(PluginInstallContract):
        distribution = "moa-ia3"
        entry_point = "ia3"
        plugin_module = "moa_ia3.plugin"
        provides = {"adapter_types": ("ia3",)}

The contracts bring their own fixtures (a tiny random base saved once per class, a
model with a tokenizer), so they need no conftest. The type or router must be
registered in the process-wide plugin registry (an installed entry point, or
``moa.testing.fresh_plugin_manager``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from moa.errors import MoaError
from moa.testing.fixtures import (
    fresh_plugin_manager,
    load_tiny_base,
    make_tiny_model,
    random_input_ids,
    save_tiny_base,
)


class AdapterTypeContract:
    """What every adapter type must do; subclass it and set :attr:`adapter_type`.

    Attributes:
        adapter_type: Registry name of the type under test (what ``get_adapter_type`` takes).
        config_kwargs: Keyword arguments of its config class for an adapter on the tiny
            Llama base (module names ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``).
        bad_config_kwargs: Overrides of ``config_kwargs`` that must each be refused with
            a :class:`~moa.errors.MoaError` (by ``validate()`` or ``add_adapter``).
        atol: Absolute tolerance of the logits comparisons.
    """

    adapter_type: ClassVar[str] = ""
    config_kwargs: ClassVar[Mapping[str, Any]] = {"target_modules": ["q_proj", "v_proj", "down_proj"]}
    bad_config_kwargs: ClassVar[Sequence[Mapping[str, Any]]] = (
        {"target_modules": []},
        {"target_modules": ["no_such_module"]},
    )
    atol: ClassVar[float] = 1e-5

    # -- fixtures and helpers (override as needed) -----------------------------------------

    @pytest.fixture
    def adapter_type_name(self) -> str:
        """The registry name under test (default: :attr:`adapter_type`)."""
        if not self.adapter_type:
            pytest.fail(f"{type(self).__name__} must set adapter_type (or override the "
                        f"adapter_type_name fixture).")
        return self.adapter_type

    @pytest.fixture(scope="class")
    @classmethod
    def contract_base_dir(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        """A tiny random base saved once for the whole contract class."""
        return save_tiny_base(tmp_path_factory.mktemp("contract-base"))

    @pytest.fixture
    def contract_model(self, contract_base_dir: Path) -> Any:
        """A fresh MixtureModel over the tiny base."""
        return make_tiny_model(contract_base_dir)

    def spec(self, adapter_type_name: str) -> Any:
        """The registered :class:`~moa.plugin.records.AdapterTypeSpec`."""
        from moa.plugin import get_adapter_type

        return get_adapter_type(adapter_type_name)

    def make_config(self, adapter_type_name: str, **overrides: Any) -> Any:
        """A config of the type under test from :attr:`config_kwargs` plus ``overrides``."""
        return self.spec(adapter_type_name).config_class(**{**self.config_kwargs, **overrides})

    def randomize(self, model: Any, adapter_name: str, seed: int) -> None:
        """Make an adapter non-trivial: add noise to every parameter of its layers.

        Override for types whose parameters need another treatment.
        """
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in model.adapter_layers(adapter_name).values():
                for param in layer.parameters():
                    noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                    param.add_(0.2 * noise.to(param.device, param.dtype))

    def add_random(self, model: Any, adapter_type_name: str, name: str, seed: int) -> None:
        """Add adapter ``name`` of the type under test and randomize it."""
        model.add_adapter(name, self.make_config(adapter_type_name))
        self.randomize(model, name, seed)

    @staticmethod
    def logits(model: Any, input_ids: torch.Tensor, **routing: Any) -> torch.Tensor:
        """The model's logits under ``routing`` (``adapter_names=`` / ``adapter_weights=``)."""
        with torch.no_grad():
            return model(input_ids, **routing).logits

    # -- the contract ----------------------------------------------------------------------

    def test_spec_is_well_formed(self, adapter_type_name: str) -> None:
        """The registered spec names its config and layer classes, which subclass moa's bases."""
        from moa.adapters.base import AdapterConfig, AdapterLayer

        spec = self.spec(adapter_type_name)
        assert spec.name == adapter_type_name
        assert issubclass(spec.config_class, AdapterConfig)
        assert issubclass(spec.layer_class, AdapterLayer)
        assert spec.layer_class.peft_suffixes, "layer_class.peft_suffixes names no PEFT tensors"
        assert spec.config_class.adapter_type == adapter_type_name

    def test_config_round_trips_through_dict(self, adapter_type_name: str) -> None:
        """``to_dict`` carries a ``peft_type``, and the config rebuilds from it unchanged."""
        config = self.make_config(adapter_type_name)
        config.validate()
        data = config.to_dict()
        assert isinstance(data.get("peft_type"), str) and data["peft_type"]
        again = type(config).from_dict(data)
        assert again.to_dict() == data

    def test_zero_init_adapter_is_identity(self, adapter_type_name: str, contract_model: Any) -> None:
        """A freshly added (default-initialised) adapter leaves the logits as the base's (to 1e-6)."""
        input_ids = random_input_ids(3, 6)
        base = self.logits(contract_model, input_ids, adapter_names=[None] * 3)
        contract_model.add_adapter("fresh", self.make_config(adapter_type_name))
        got = self.logits(contract_model, input_ids, adapter_names=["fresh"] * 3)
        torch.testing.assert_close(got, base, rtol=0, atol=1e-6)

    def test_save_load_round_trip_gives_same_logits(
        self, adapter_type_name: str, contract_model: Any, contract_base_dir: Path, tmp_path: Path
    ) -> None:
        """Saved in PEFT's layout and loaded into a new model, the adapter gives the same logits."""
        from moa.model.mixture_model import MixtureModel

        input_ids = random_input_ids(3, 6)
        self.add_random(contract_model, adapter_type_name, "saved", seed=1)
        before = self.logits(contract_model, input_ids, adapter_names=["saved"] * 3)
        base = self.logits(contract_model, input_ids, adapter_names=[None] * 3)
        assert not torch.allclose(before, base), (
            "the randomized adapter does not change the logits; override randomize()")
        contract_model.save_adapter("saved", tmp_path / "saved")
        other = MixtureModel(load_tiny_base(contract_base_dir))
        other.load_adapter(tmp_path / "saved", adapter_name="saved")
        assert type(other.peft_config["saved"]) is type(contract_model.peft_config["saved"])
        after = self.logits(other, input_ids, adapter_names=["saved"] * 3)
        torch.testing.assert_close(after, before, rtol=0, atol=self.atol)

    def test_wrong_tensor_shape_is_refused(
        self, adapter_type_name: str, contract_model: Any, contract_base_dir: Path, tmp_path: Path
    ) -> None:
        """A saved tensor of the wrong shape is refused with a ``MoaError`` at load, and nothing stays loaded."""
        from safetensors.torch import load_file, save_file

        from moa.model.mixture_model import MixtureModel

        input_ids = random_input_ids(1, 4)
        self.add_random(contract_model, adapter_type_name, "a", seed=2)
        self.logits(contract_model, input_ids, adapter_names=["a"])  # lazy initialisation, if any
        contract_model.save_adapter("a", tmp_path / "a")
        weights = tmp_path / "a" / "adapter_model.safetensors"
        tensors = load_file(weights)
        key = min(tensors)
        tensors[key] = torch.cat([tensors[key], tensors[key][:1]], dim=0)
        save_file(tensors, weights)
        other = MixtureModel(load_tiny_base(contract_base_dir))
        with pytest.raises(MoaError):
            other.load_adapter(tmp_path / "a", adapter_name="a")
        assert other.adapter_names == []

    def test_mixed_batch_equals_per_row_loop(self, adapter_type_name: str, contract_model: Any) -> None:
        """One batch with a different adapter on each row equals each row run alone."""
        from moa.adapters.lora import LoraConfig

        model = contract_model
        self.add_random(model, adapter_type_name, "t1", seed=3)
        self.add_random(model, adapter_type_name, "t2", seed=4)
        model.add_adapter("lora", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                             init_lora_weights=False))
        input_ids = random_input_ids(5, 6)
        names = ["t1", "t2", None, "lora", "t1"]
        batched = self.logits(model, input_ids, adapter_names=names)
        for i, name in enumerate(names):
            alone = self.logits(model, input_ids[i : i + 1], adapter_names=[name])
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=self.atol)
        mixtures = [{"t1": 1.0}, {"t1": 0.5, "t2": 0.5}, None, {"lora": 0.7, "t2": 0.3}, {"t2": 1.0}]
        batched = self.logits(model, input_ids, adapter_weights=mixtures)
        for i, mixture in enumerate(mixtures):
            alone = self.logits(model, input_ids[i : i + 1], adapter_weights=[mixture])
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=self.atol)

    def test_bad_configs_raise_moa_errors(self, adapter_type_name: str, contract_model: Any) -> None:
        """Every config in ``bad_config_kwargs`` is refused with a ``MoaError``, and no adapter is left behind."""
        for overrides in self.bad_config_kwargs:
            with pytest.raises(MoaError):
                config = self.make_config(adapter_type_name, **overrides)
                config.validate()
                contract_model.add_adapter("bad", config)
            assert contract_model.adapter_names == [], f"a refused config {overrides} left an adapter"

    def test_gradients_reach_only_the_adapter(self, adapter_type_name: str, contract_model: Any) -> None:
        """A backward pass gives every adapter parameter a finite, non-zero gradient and the frozen base none."""
        model = contract_model
        self.add_random(model, adapter_type_name, "tuned", seed=5)
        input_ids = random_input_ids(2, 6)
        out = model(input_ids, adapter_names=["tuned", "tuned"], labels=input_ids)
        out.loss.backward()
        adapter_params = [p for layer in model.adapter_layers("tuned").values() for p in layer.parameters()]
        assert adapter_params and all(p.grad is not None for p in adapter_params)
        assert all(torch.isfinite(p.grad).all() for p in adapter_params)
        assert sum(float(p.grad.abs().sum()) for p in adapter_params) > 0
        assert all(p.grad is None for p in model.base_model.parameters() if not p.requires_grad)


class RouterContract:
    """What every router must do; subclass it and provide a ``router`` fixture.

    Attributes:
        router_name: Registry name to check (``get_router(router_name)``); empty skips that check.
        adapter_names: Adapters (zero-initialised LoRA) loaded on the contract model.
        texts: Prompts of the routed batch.
    """

    router_name: ClassVar[str] = ""
    adapter_names: ClassVar[tuple[str, ...]] = ("alpha", "beta", "gamma")
    texts: ClassVar[tuple[str, ...]] = (
        "SELECT name FROM users WHERE id = 1",
        "def add(a, b): return a + b",
        "What is 12 times 7?",
        "Write a short poem about the sea.",
    )

    @pytest.fixture
    def router(self, routing_model: Any) -> Any:
        """The router under test; subclasses must override this fixture."""
        pytest.fail(f"{type(self).__name__} must define a `router` fixture returning the router.")

    @pytest.fixture(scope="class")
    @classmethod
    def contract_base_dir(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        """A tiny random base saved once for the whole contract class."""
        return save_tiny_base(tmp_path_factory.mktemp("router-contract-base"))

    @pytest.fixture
    def routing_model(self, contract_base_dir: Path) -> Any:
        """A tiny MixtureModel with a tokenizer and zero-init LoRA adapters :attr:`adapter_names`."""
        from moa.adapters.lora import LoraConfig

        model = make_tiny_model(contract_base_dir)
        for name in self.adapter_names:
            model.add_adapter(name, LoraConfig(r=2, target_modules=["q_proj"]))
        return model

    def make_request(self, model: Any, router: Any) -> Any:
        """The :class:`~moa.routing.RoutingRequest` a model builds for :attr:`texts`."""
        from moa.routing import RoutingRequest

        encoded = model.tokenize(list(self.texts))
        hidden = None
        if router.hidden_layer is not None:
            hidden = model.hidden_states_at(router.hidden_layer, encoded["input_ids"], encoded["attention_mask"])
        return RoutingRequest(input_ids=encoded["input_ids"], adapter_names=model.adapter_names,
                              attention_mask=encoded["attention_mask"], texts=list(self.texts),
                              hidden_states=hidden)

    def check_decision(self, decision: Any, request: Any, router: Any) -> None:
        """Assert ``decision`` is a valid answer to ``request``."""
        from moa.routing import RoutingDecision

        assert isinstance(decision, RoutingDecision)
        batch, seq_len = (int(s) for s in request.input_ids.shape)
        expected_rows = batch * seq_len if decision.level == "token" else batch
        assert decision.level == ("token" if router.level == "token" else "row")
        assert decision.ids.shape[0] == expected_rows
        assert decision.ids.dtype == torch.int32 and decision.weights.dtype == torch.float32
        ids, weights = decision.ids, decision.weights
        assert bool(((ids >= -1) & (ids < len(request.adapter_names))).all()), "adapter id out of range"
        assert bool(torch.isfinite(weights).all()), "non-finite routing weight"
        assert bool((weights >= 0).all()), "negative routing weight"
        assert bool((weights[ids < 0] == 0).all()), "weight on an empty (-1) slot"

    # -- the contract ----------------------------------------------------------------------

    def test_router_is_registered(self, router: Any) -> None:
        """The router is a ``Router`` of a known level and, when ``router_name`` is set, of the class registered under it."""
        from moa.plugin import get_router
        from moa.routing import Router

        assert isinstance(router, Router)
        assert router.level in ("sequence", "token")
        if self.router_name:
            assert isinstance(router, get_router(self.router_name))

    def test_decision_is_valid_for_the_batch(self, router: Any, routing_model: Any) -> None:
        """The decision has a row per input row (per token for token routers), known adapter ids and finite, non-negative weights."""
        request = self.make_request(routing_model, router)
        self.check_decision(router.route(request), request, router)

    def test_routing_is_deterministic(self, router: Any, routing_model: Any) -> None:
        """The same request routes to the same ids and weights twice."""
        request = self.make_request(routing_model, router)
        first, second = router.route(request), router.route(request)
        assert torch.equal(first.ids, second.ids) and torch.equal(first.weights, second.weights)

    def test_routes_inside_the_model(self, router: Any, routing_model: Any) -> None:
        """Set on a model, the router gives one mixture per prompt through ``model.route``."""
        routing_model.set_router(router)
        mixtures = routing_model.route(list(self.texts))
        assert len(mixtures) == len(self.texts)
        for mixture in mixtures:
            assert set(mixture) <= set(self.adapter_names)
            assert all(math.isfinite(w) and w >= 0 for w in mixture.values())
        encoded = routing_model.tokenize(list(self.texts))
        with torch.no_grad():
            out = routing_model(encoded["input_ids"], attention_mask=encoded["attention_mask"])
        assert out.logits.shape[:2] == encoded["input_ids"].shape
        assert bool(torch.isfinite(out.logits).all())

    def test_save_load_round_trip(self, router: Any, routing_model: Any, tmp_path: Path) -> None:
        """A router with ``save``/``load`` writes ``router_config.json`` and loads back to the same decisions."""
        if not (callable(getattr(router, "save", None)) and callable(getattr(type(router), "load", None))):
            pytest.skip(f"{type(router).__name__} has no save()/load(); nothing to round-trip.")
        router.save(tmp_path / "router")
        assert (tmp_path / "router" / "router_config.json").is_file()
        again = type(router).load(tmp_path / "router")
        request = self.make_request(routing_model, router)
        first, second = router.route(request), again.route(request)
        assert torch.equal(first.ids, second.ids)
        torch.testing.assert_close(first.weights, second.weights, rtol=0, atol=1e-6)


__all__ = ["AdapterTypeContract", "RouterContract"]


class PluginInstallContract:
    """What an installed plugin package must show; subclass it and name the package.

    Checks the three ways a user meets the package: its ``moa`` entry point in the
    distribution's metadata (not requiring ``moa``, so installing it never makes pip look
    for moa on an index), its row in ``moa plugins``, and discovery in a fresh Python
    process, where every name it provides must resolve (adapter types also by their
    ``peft_type``, as PEFT folders are routed).

    Attributes:
        distribution: The pip distribution name, e.g. ``"moa-ia3"``.
        entry_point: The entry point's name in the ``moa`` group, e.g. ``"ia3"``.
        plugin_module: The entry point's value, e.g. ``"moa_ia3.plugin"``.
        provides: Kind -> names, as ``moa plugins`` lists them, e.g.
            ``{"adapter_types": ("ia3",)}`` (kinds: ``adapter_types``, ``input_adapter_types``,
            ``routers``, ``merge_strategies``).
    """

    distribution: ClassVar[str] = ""
    entry_point: ClassVar[str] = ""
    plugin_module: ClassVar[str] = ""
    provides: ClassVar[Mapping[str, Sequence[str]]] = {}

    def _plugin_version(self) -> str:
        package = importlib.import_module(self.plugin_module.split(".")[0])
        return str(package.__version__)

    def test_entry_point_metadata_names_the_plugin_module(self) -> None:
        dist = importlib.metadata.distribution(self.distribution)
        eps = [ep for ep in dist.entry_points if ep.group == "moa"]
        assert [(ep.name, ep.value) for ep in eps] == [(self.entry_point, self.plugin_module)]
        assert dist.version == self._plugin_version()
        requires = [re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0].lower() for r in dist.requires or []]
        assert "moa" not in requires  # installing the plugin never makes pip look for moa on an index

    def test_moa_plugins_lists_it(self) -> None:
        from moa.cli import main
        from moa.plugin.report import format_provides

        out = io.StringIO()
        with fresh_plugin_manager(), contextlib.redirect_stdout(out):
            assert main(["plugins"]) == 0
        row = next(line for line in out.getvalue().splitlines() if line.startswith(f"{self.entry_point} "))
        assert row.split()[:5] == [self.entry_point, self.distribution, self._plugin_version(), "entry", "point"]
        assert row.rstrip().endswith(format_provides(self.provides))

    def test_fresh_process_discovers_what_it_provides(self) -> None:
        code = textwrap.dedent("""
            import json, sys
            import moa.plugin as plugin
            wanted = json.loads(sys.argv[1])
            info = {i.name: i for i in plugin.list_plugins()}[wanted["entry_point"]]
            found = {kind: list(names) for kind, names in info.provides.items()}
            resolved = {
                "adapter_types": [plugin.get_adapter_type(n).name for n in wanted["provides"].get("adapter_types", [])],
                "by_peft_type": [[spec.name, plugin.adapter_type_for_config({"peft_type": spec.peft_type}).name]
                                 for spec in map(plugin.get_adapter_type, wanted["provides"].get("adapter_types", []))
                                 if spec.peft_type],  # a variant of another type (DoRA is LORA) has none
                "input_adapter_types": [plugin.get_input_adapter_type(n).name
                                        for n in wanted["provides"].get("input_adapter_types", [])],
                "routers": [plugin.get_router_spec(n).name for n in wanted["provides"].get("routers", [])],
            }
            print(json.dumps([info.distribution, info.version, info.source, found, resolved]))
        """)
        wanted = {"entry_point": self.entry_point, "provides": {k: list(v) for k, v in self.provides.items()}}
        env = {k: v for k, v in os.environ.items() if k != "MOA_DISABLE_PLUGINS"}
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(wanted)], check=False, capture_output=True,
                              text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        distribution, version, source, found, resolved = json.loads(proc.stdout.strip().splitlines()[-1])
        assert [distribution, version, source] == [self.distribution, self._plugin_version(), "entry point"]
        assert found == wanted["provides"]
        adapter_types = wanted["provides"].get("adapter_types", [])
        assert all(name == found_by_peft_type for name, found_by_peft_type in resolved["by_peft_type"])
        assert resolved == {"adapter_types": adapter_types, "by_peft_type": resolved["by_peft_type"],
                            "input_adapter_types": wanted["provides"].get("input_adapter_types", []),
                            "routers": wanted["provides"].get("routers", [])}
