"""Built-in plugin: moa's merge strategies (``linear``, ``cat``, ``svd``, TIES, DARE, ...).

Registered through the same ``moa_merge_strategies`` hook a third-party plugin uses; the
strategy signature is documented in :mod:`moa.merge.strategies`.
"""

from __future__ import annotations

from moa.hookspecs import hookimpl
from moa.plugin.records import MergeStrategySpec


@hookimpl
def moa_merge_strategies() -> list[MergeStrategySpec]:
    """Provide every built-in merge strategy.

    The strategies module is imported here, not at module level, so listing plugins stays
    cheap and an import problem is reported against this plugin.

    Returns:
        One :class:`MergeStrategySpec` per strategy in ``BUILTIN_STRATEGIES``.
    """
    from moa.merge.strategies import BUILTIN_STRATEGIES

    return [
        MergeStrategySpec(name=name, function=function, description=description)
        for name, (function, description) in BUILTIN_STRATEGIES.items()
    ]
