"""The pluggy hook specifications of moa.

A plugin is any module (or object) with functions decorated by :data:`hookimpl` whose
names match the hooks below. Every hook takes no positional arguments and returns a
list of records; a plugin never mutates moa's globals. Built-ins use the same hooks
(see ``moa/default_plugins``).

Example, a complete third-party plugin module registered under the ``moa`` entry-point
group (``[project.entry-points.moa] shout = "moa_shout.plugin"``)::

    import moa
    from moa.hookspecs import hookimpl
    from moa.plugin.records import RouterSpec

    class ShoutRouter(moa.Router):
        ...

    @hookimpl
    def moa_routers():
        return [RouterSpec(name="shout", router_class=ShoutRouter, description="...")]
"""

from __future__ import annotations

import pluggy

from moa.plugin.records import AdapterTypeSpec, InputAdapterTypeSpec, MergeStrategySpec, RouterSpec

PROJECT_NAME = "moa"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def moa_adapter_types() -> list[AdapterTypeSpec]:
    """Return the adapter types this plugin provides.

    Example::

        @hookimpl
        def moa_adapter_types():
            return [AdapterTypeSpec(name="lora", config_class=LoraConfig,
                                    layer_class=LoraLayer, peft_type="LORA")]
    """


@hookspec
def moa_input_adapter_types() -> list[InputAdapterTypeSpec]:
    """Return the input-level adapter types this plugin provides (prompt / prefix tuning...).

    Example::

        @hookimpl
        def moa_input_adapter_types():
            return [InputAdapterTypeSpec(name="prompt_tuning", config_class=PromptTuningConfig,
                                         adapter_class=PromptTuningAdapter, peft_type="PROMPT_TUNING")]
    """


@hookspec
def moa_routers() -> list[RouterSpec]:
    """Return the routers this plugin provides.

    Example::

        @hookimpl
        def moa_routers():
            return [RouterSpec(name="fixed", router_class=FixedRouter)]
    """


@hookspec
def moa_merge_strategies() -> list[MergeStrategySpec]:
    """Return the merge strategies this plugin provides.

    Example::

        @hookimpl
        def moa_merge_strategies():
            return [MergeStrategySpec(name="linear", function=linear_merge)]
    """


__all__ = [
    "AdapterTypeSpec",
    "InputAdapterTypeSpec",
    "MergeStrategySpec",
    "RouterSpec",
    "hookimpl",
    "hookspec",
    "moa_adapter_types",
    "moa_input_adapter_types",
    "moa_merge_strategies",
    "moa_routers",
]
