"""The ``moa_input_adapter_types`` hook: registration, record checks, conflicts with adapter types, listing."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import types
from typing import ClassVar

import pytest

from moa.adapters.input_level import InputAdapter, InputAdapterConfig
from moa.errors import PluginConflictError, PluginError, UnknownPluginError
from moa.hookspecs import hookimpl
from moa.plugin import MoaPluginManager
from moa.plugin.records import RECORD_TYPES, AdapterTypeSpec, InputAdapterTypeSpec
from moa.plugin.report import format_provides


@dataclasses.dataclass
class _Config(InputAdapterConfig):
    adapter_type: ClassVar[str] = "soft"
    peft_type: ClassVar[str] = "SOFT"


class _Adapter(InputAdapter):
    pass


def _plugin(*specs: InputAdapterTypeSpec, adapter_types: tuple[AdapterTypeSpec, ...] = ()) -> types.ModuleType:
    module = types.ModuleType("input_plugin")

    @hookimpl
    def moa_input_adapter_types():
        return list(specs)

    module.moa_input_adapter_types = moa_input_adapter_types
    if adapter_types:
        @hookimpl
        def moa_adapter_types():
            return list(adapter_types)

        module.moa_adapter_types = moa_adapter_types
    return module


def _spec(name: str = "soft", peft_type: str | None = "SOFT", **overrides) -> InputAdapterTypeSpec:
    fields = dict(name=name, config_class=_Config, adapter_class=_Adapter, peft_type=peft_type, description="test")
    return InputAdapterTypeSpec(**{**fields, **overrides})


def test_the_record_type_is_registered_for_the_hook():
    assert RECORD_TYPES["moa_input_adapter_types"] is InputAdapterTypeSpec


def test_registered_type_is_looked_up_by_name_and_peft_type():
    pm = MoaPluginManager(load_entry_points=False)
    pm.register(_plugin(_spec()), name="soft_plugin")
    assert pm.get_input_adapter_type("soft").adapter_class is _Adapter
    assert pm.input_adapter_type_for_peft_type("soft") is pm.get_input_adapter_type("soft")
    assert pm.input_adapter_type_for_peft_type("LORA") is None and pm.input_adapter_type_for_peft_type(None) is None
    assert pm.specs("input_adapter_types") == {"soft": pm.get_input_adapter_type("soft")}
    info = {i.name: i for i in pm.list_plugins()}["soft_plugin"]
    assert info.provides == {"input_adapter_types": ("soft",)}
    with pytest.raises(UnknownPluginError, match=r"Unknown input adapter type 'sfot'.*Did you mean 'soft'"):
        pm.get_input_adapter_type("sfot")
    # a folder of an input-level type whose plugin is missing: the Linear-level lookup names both kinds
    with pytest.raises(UnknownPluginError, match=r"SOFT \(soft\)"):
        pm.adapter_type_for_peft_type("PREFIX_TUNING_X")


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"adapter_class": object}, "adapter_class"),
        ({"config_class": dict}, "config_class"),
        ({"peft_type": ""}, "peft_type"),
    ],
)
def test_bad_records_are_refused(overrides, problem):
    pm = MoaPluginManager(load_builtins=False, load_entry_points=False)
    with pytest.raises(PluginError, match=problem):
        pm.register(_plugin(_spec(**overrides)), name="bad")
    assert pm.specs("input_adapter_types") == {}


def test_peft_type_and_name_are_unique_across_both_adapter_kinds():
    pm = MoaPluginManager(load_entry_points=False)  # the built-in LoRA type owns LORA and "lora"
    with pytest.raises(PluginConflictError, match="peft_type 'LORA'"):
        pm.register(_plugin(_spec(peft_type="LORA")), name="clash_peft")
    with pytest.raises(PluginConflictError, match="input adapter type 'lora'"):
        pm.register(_plugin(_spec(name="lora", peft_type=None)), name="clash_name")
    linear = AdapterTypeSpec(name="soft", config_class=_Config, layer_class=_Adapter, peft_type=None)
    with pytest.raises(PluginConflictError, match="'soft'"):
        pm.register(_plugin(_spec(), adapter_types=(linear,)), name="clash_own")
    assert pm.specs("input_adapter_types") == {}


def test_moa_plugins_shows_input_adapter_types(monkeypatch):
    from moa.cli import main
    from moa.testing import fresh_plugin_manager

    assert format_provides({"input_adapter_types": ("a", "b")}) == "input adapter types: a, b"
    with fresh_plugin_manager([_plugin(_spec(name="soft_listed", peft_type="SOFT_LISTED"))]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["plugins"]) == 0
    row = next(line for line in out.getvalue().splitlines() if line.startswith("input_plugin"))
    assert row.rstrip().endswith("input adapter types: soft_listed")
