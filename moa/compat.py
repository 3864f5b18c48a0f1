"""Every private name and version-dependent API of another library that moa relies on, in one place.

moa reaches past a library's public API only where that library offers no public way, and only
here, so that a release that renames or drops one of these fails one named test
(``tests/test_compat.py``) instead of somewhere deep in a forward, and so that ``make
test-oldest`` / ``make test-latest`` show which versions each one holds for.

| What moa uses | Library | Why |
|---|---|---|
| ``functional._convert_weight_packed_for_cpu_inverse`` | bitsandbytes | undo bnb's AVX512-BF16 CPU repacking the way bnb itself does |
| ``config._attn_implementation`` | transformers | read which attention a model runs (transformers documents this read) |
| ``model._tied_weights_keys`` | transformers | which state-dict keys a fresh model ties and so needs no value for |
| ``TrainingArguments(activation_checkpointing=...)`` | transformers | newer releases; older ones spell it ``gradient_checkpointing`` |
| the Hub client's transport errors | huggingface_hub's HTTP stack | ``httpx2`` (hub 2.x), ``httpx`` (1.x) or ``requests`` (0.x) |
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

# HTTP client modules the Hub client has used, newest first, and each one's base class for
# failures to reach the server (refused, reset, timed out...), as opposed to an HTTP answer.
_TRANSPORT_ERRORS = (("httpx2", "TransportError"), ("httpx", "TransportError"),
                     ("requests", "ConnectionError"), ("requests", "Timeout"))


def hub_transport_errors() -> tuple[type[BaseException], ...]:
    """The exception classes meaning "the Hub could not be reached", for every HTTP client installed.

    Always includes the builtins ``ConnectionError`` and ``TimeoutError``; adds ``httpx2``'s,
    ``httpx``'s and ``requests``' transport errors where those packages import.
    """
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name, class_name in _TRANSPORT_ERRORS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        error = getattr(module, class_name, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            found.append(error)
    return tuple(found)


def bnb_cpu_unpack() -> Callable[[Any, Any], tuple[Any, Any]]:
    """bitsandbytes' inverse of its AVX512-BF16 CPU weight packing: ``(data, state) -> (data, state)``.

    Raises:
        RuntimeError: The installed bitsandbytes has no such function (name and version said).
    """
    import bitsandbytes
    from bitsandbytes import functional

    unpack = getattr(functional, "_convert_weight_packed_for_cpu_inverse", None)
    if unpack is None:
        raise RuntimeError(
            f"bitsandbytes {bitsandbytes.__version__} has no functional._convert_weight_packed_for_cpu_inverse, "
            "which moa needs to undo its CPU packing; install the version in requirements/lock.txt.")
    return unpack


def attn_implementation(config: Any) -> str | None:
    """The attention implementation a transformers config selects (``"sdpa"``, ``"eager"``...), or None."""
    return getattr(config, "_attn_implementation", None)


def tied_weights_keys(model: Any) -> set[str]:
    """The state-dict keys a transformers model ties to others (empty when it declares none).

    transformers has held these as a list and, in newer releases, as a ``{target: source}``
    mapping; either way the keys are the tied names.
    """
    keys = getattr(model, "_tied_weights_keys", None) or []
    return set(keys.keys() if isinstance(keys, dict) else keys)


def checkpointing_argument(enabled: bool) -> dict[str, bool]:
    """``TrainingArguments`` keyword that turns activation (gradient) checkpointing on or off."""
    from transformers import TrainingArguments

    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: bool(enabled)}
