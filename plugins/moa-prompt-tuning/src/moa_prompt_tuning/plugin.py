"""The plugin module named by this package's ``moa`` entry point.

It uses only moa's public plugin API: ``moa.hookspecs.hookimpl`` and
``moa.plugin.records.InputAdapterTypeSpec``.
"""

from __future__ import annotations

from moa.hookspecs import hookimpl
from moa.plugin.records import InputAdapterTypeSpec


@hookimpl
def moa_input_adapter_types() -> list[InputAdapterTypeSpec]:
    """Provide ``"prompt_tuning"`` (PEFT's ``PROMPT_TUNING``) and ``"prefix_tuning"`` (``PREFIX_TUNING``).

    Returns:
        Two :class:`InputAdapterTypeSpec`.
    """
    from moa_prompt_tuning.prefix_tuning import PrefixTuningAdapter, PrefixTuningConfig
    from moa_prompt_tuning.prompt_tuning import PromptTuningAdapter, PromptTuningConfig

    return [
        InputAdapterTypeSpec(
            name="prompt_tuning",
            config_class=PromptTuningConfig,
            adapter_class=PromptTuningAdapter,
            peft_type="PROMPT_TUNING",
            description="Prompt tuning: learned virtual token embeddings before each row's tokens; PEFT-compatible.",
        ),
        InputAdapterTypeSpec(
            name="prefix_tuning",
            config_class=PrefixTuningConfig,
            adapter_class=PrefixTuningAdapter,
            peft_type="PREFIX_TUNING",
            description="Prefix tuning: learned key/values before each row's tokens in every layer; PEFT-compatible.",
        ),
    ]
