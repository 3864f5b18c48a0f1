"""A broken plugin is skipped with exactly one warning, or raises under MOA_STRICT_PLUGINS=1."""

from __future__ import annotations

import logging

import pytest

from moa.errors import PluginError, UnknownPluginError


def _broken_import_dist(make_dist, router_source):
    make_dist("goodplug", "1.1", {"good": "goodplug_mod"},
              {"goodplug_mod": router_source("good_router")})
    make_dist("brokenplug", "2.3", {"broken": "brokenplug_mod"},
              {"brokenplug_mod": "import nonexistent_dependency_xyz\n"})


def test_import_failure_skipped_with_one_warning_and_log(
        make_dist, fresh_manager, router_source, warning_log, caplog):
    _broken_import_dist(make_dist, router_source)

    with caplog.at_level(logging.WARNING, logger="moa.plugin.manager"):
        pm = fresh_manager()

    messages = warning_log.plugin("'broken'")
    assert len(messages) == 1, messages
    message = messages[0]
    for part in ("'broken'", "brokenplug 2.3", "failed to import",
                 "ModuleNotFoundError", "nonexistent_dependency_xyz",
                 "pip uninstall brokenplug", "MOA_DISABLE_PLUGINS=broken"):
        assert part in message, (part, message)
    assert [r.getMessage() for r in caplog.records if "'broken'" in r.getMessage()] == [message]
    # the other plugin is unaffected
    assert pm.get_router("good_router").__name__ == "GoodRouterRouter"
    infos = {i.name: i for i in pm.list_plugins()}
    assert infos["broken"].status == "failed"
    assert infos["broken"].error.startswith("ModuleNotFoundError:")
    assert infos["good"].status == "loaded"


def test_strict_mode_raises_the_same_message(make_dist, fresh_manager, router_source,
                                             warning_log, monkeypatch):
    _broken_import_dist(make_dist, router_source)
    fresh_manager()
    (warned,) = warning_log.plugin("'broken'")

    monkeypatch.setenv("MOA_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError) as exc:
        fresh_manager()
    assert str(exc.value) == warned
    assert isinstance(exc.value.__cause__, ModuleNotFoundError)


def test_strict_argument_overrides_env(make_dist, fresh_manager, router_source, monkeypatch):
    _broken_import_dist(make_dist, router_source)
    monkeypatch.setenv("MOA_STRICT_PLUGINS", "1")
    with pytest.warns(UserWarning, match="brokenplug 2.3"):
        pm = fresh_manager(strict=False)
    assert pm.strict is False


HOOK_RAISES = '''
from moa.hookspecs import hookimpl

@hookimpl
def moa_routers():
    raise RuntimeError("boom in hook")
'''


def test_hook_that_raises_is_isolated(make_dist, fresh_manager, router_source, warning_log):
    make_dist("goodplug", "1.1", {"good": "goodplug_mod"},
              {"goodplug_mod": router_source("good_router")})
    make_dist("raiseplug", "0.9", {"raiser": "raiseplug_mod"}, {"raiseplug_mod": HOOK_RAISES})

    pm = fresh_manager()

    (message,) = warning_log.plugin("'raiser'")
    assert "raiseplug 0.9" in message
    assert "raised in its hook moa_routers()" in message
    assert "RuntimeError: boom in hook" in message
    assert not pm.pluggy_manager.has_plugin("raiser")  # unregistered again
    assert pm.get_router("good_router")
    with pytest.raises(UnknownPluginError, match="Plugins that failed to load: raiser"):
        pm.get_router("raise_router")


WRONG_RETURNS = {
    "not_a_list": "{'name': 'x'}",
    "none": "None",
    "wrong_record_type": "[MergeStrategySpec(name='x', function=len)]",
    "strings": "['keyword']",
    "not_a_router_class": "[RouterSpec(name='x', router_class=int)]",
    "empty_name": "[RouterSpec(name='', router_class=FixedRouter)]",
    "duplicate_name": "[RouterSpec(name='x', router_class=FixedRouter)] * 2",
}


@pytest.mark.parametrize("case", sorted(WRONG_RETURNS))
def test_hook_returning_wrong_types_is_isolated(case, make_dist, fresh_manager, warning_log):
    source = f'''
from moa.hookspecs import hookimpl
from moa.plugin.records import MergeStrategySpec, RouterSpec
from moa.routing import FixedRouter

@hookimpl
def moa_routers():
    return {WRONG_RETURNS[case]}
'''
    make_dist("wrongplug", "3.0", {"wrong": "wrongplug_mod"}, {"wrongplug_mod": source})

    pm = fresh_manager()

    (message,) = warning_log.plugin("'wrong'")
    assert "wrongplug 3.0" in message
    assert "returned invalid records from moa_routers()" in message
    assert {i.name: i.status for i in pm.list_plugins()}["wrong"] == "failed"
    assert "x" not in pm.specs("routers")


MISSPELLED = '''
from moa.hookspecs import hookimpl
from moa.plugin.records import RouterSpec
from moa.routing import FixedRouter

@hookimpl
def moa_router():
    return [RouterSpec(name="typo_router", router_class=FixedRouter)]
'''


def test_misspelled_hook_is_caught_and_plugin_skipped(make_dist, fresh_manager, warning_log):
    make_dist("typoplug", "0.1", {"typo": "typoplug_mod"}, {"typoplug_mod": MISSPELLED})

    pm = fresh_manager()

    (message,) = warning_log.plugin("'typo'")
    assert "typoplug 0.1" in message
    assert "implements an unknown hook" in message
    assert "'moa_router'" in message and "did you mean 'moa_routers'" in message
    assert "moa_adapter_types, moa_input_adapter_types, moa_merge_strategies, moa_routers" in message
    assert not pm.pluggy_manager.has_plugin("typo")
    pm.check_pending()  # nothing pending is left behind
    with pytest.raises(UnknownPluginError):
        pm.get_router("typo_router")


def test_plugin_failing_pluggy_validation_is_skipped(make_dist, fresh_manager, warning_log):
    source = MISSPELLED.replace("def moa_router():", "def moa_routers(config):")
    make_dist("argplug", "0.2", {"args": "argplug_mod"}, {"argplug_mod": source})

    pm = fresh_manager()

    (message,) = warning_log.plugin("'args'")
    assert "was rejected by pluggy on register" in message
    assert "PluginValidationError" in message and "config" in message
    assert not pm.pluggy_manager.has_plugin("args")


def test_check_pending_names_plugin_hook_and_valid_hooks(fresh_manager):
    import types

    from moa.hookspecs import hookimpl

    bad = types.ModuleType("bad_direct")

    @hookimpl
    def moa_merge_strategy():  # misspelled, registered behind the manager's back
        return []

    bad.moa_merge_strategy = moa_merge_strategy
    pm = fresh_manager(load_entry_points=False)
    pm.check_pending()
    pm.pluggy_manager.register(bad, name="bad_direct")

    with pytest.raises(PluginError) as exc:
        pm.check_pending()
    message = str(exc.value)
    assert "'bad_direct'" in message
    assert "'moa_merge_strategy' (did you mean 'moa_merge_strategies'?)" in message
    assert "Valid hooks: moa_adapter_types, moa_input_adapter_types, moa_merge_strategies, moa_routers" in message


def test_plugin_looking_up_plugins_at_import_gets_a_clear_error(make_dist, warning_log):
    from moa.plugin import get_router

    make_dist("eagerplug", "1.0", {"eager": "eagerplug_mod"},
              {"eagerplug_mod": "from moa.plugin import get_router\nget_router('fixed')\n"})

    assert get_router("fixed").__name__ == "FixedRouter"  # the process-wide manager still builds

    (message,) = warning_log.plugin("'eager'")
    assert "while it was being imported" in message


def test_plugin_without_any_hookimpl_is_skipped_with_a_hint(make_dist, fresh_manager,
                                                            warning_log):
    source = "from moa.plugin.records import RouterSpec\n\ndef moa_routers():\n    return []\n"
    make_dist("nohookplug", "0.1", {"nohook": "nohookplug_mod"}, {"nohookplug_mod": source})

    pm = fresh_manager()

    (message,) = warning_log.plugin("'nohook'")
    assert "implements no moa hook" in message
    assert "moa_routers lack the @hookimpl decorator" in message
    assert {i.name: i.status for i in pm.list_plugins()}["nohook"] == "failed"
    assert not pm.pluggy_manager.has_plugin("nohook")
