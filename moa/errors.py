"""The exceptions moa raises.

Every error is a :class:`MoaError` and also subclasses the closest builtin, so
``except KeyError`` or ``except ValueError`` in user code keeps working. Messages
follow one rule: what failed, the offending value, the valid choices, the next step.
"""

from __future__ import annotations

from collections.abc import Iterable


def format_choices(choices: Iterable[str]) -> str:
    """Render a sorted, comma-separated list of choices (or ``(none)``)."""
    names = sorted(str(c) for c in choices)
    return ", ".join(names) if names else "(none)"


class MoaError(Exception):
    """Base class of every error moa raises on purpose."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else self.__class__.__name__


# --- names that do not exist -------------------------------------------------------------


class UnknownAdapterError(MoaError, KeyError):
    """An adapter name that is not loaded in the model."""


class UnknownPluginError(MoaError, KeyError):
    """An adapter type, router or merge strategy that no plugin registers."""


class BackendUnavailableError(MoaError, RuntimeError):
    """A kernel backend that was asked for but cannot run here."""


class MissingDependencyError(MoaError, ImportError):
    """An optional package needed for this operation is not installed."""


# --- plugins -----------------------------------------------------------------------------


class PluginError(MoaError, RuntimeError):
    """A plugin failed to import, register or answer a hook."""


class PluginConflictError(PluginError):
    """Two plugins register the same name for the same kind of thing."""


# --- adapters and their files ------------------------------------------------------------


class AdapterError(MoaError, ValueError):
    """An adapter cannot be created, loaded or saved as asked."""


class AdapterConfigError(AdapterError):
    """An adapter config with invalid or unsupported values."""


class AdapterFormatError(AdapterError):
    """An adapter file that is missing, corrupt, truncated or not safetensors."""


class AdapterShapeError(AdapterError):
    """Adapter tensors whose shapes or ranks do not fit the base model."""


class TargetModuleError(AdapterError):
    """``target_modules`` that match nothing (or something that is not a linear layer)."""


class BaseModelMismatchError(AdapterError):
    """An adapter (or mixture) made for another base model (fingerprint differs)."""


class AdapterExistsError(AdapterError):
    """An adapter name that is already taken in the model."""


class AdapterNameError(AdapterExistsError):
    """An adapter name that is not allowed: a path separator, ``..``, a control, bidi or non-ASCII
    look-alike character, or a reserved name (a subclass of :class:`AdapterExistsError`, which
    moa raised for these before)."""


# --- limits ------------------------------------------------------------------------------


class NonFiniteOutputError(MoaError, ArithmeticError):
    """A forward whose logits hold NaN or infinities on rows that adapters computed."""


class InputLimitError(MoaError, ValueError):
    """An input beyond one of moa's limits: a prompt longer than the base's context, too many new
    tokens, too many adapters. Refused before any work starts."""


# --- routing -----------------------------------------------------------------------------


class RoutingError(MoaError, ValueError):
    """A routing request that cannot be honoured (bad names, weights or shapes)."""


# --- the Hub, manifests and the registry ------------------------------------------------


class HubError(MoaError, OSError):
    """The Hub (or its local cache) cannot give or take what was asked: repo, revision, network."""


class IntegrityError(MoaError, ValueError):
    """A file whose sha256 (or git blob id) differs from the one it was pinned or listed with."""


class UnsafeFileError(MoaError, ValueError):
    """A file refused before download: unsafe name (absolute, ``..``), pickle format, or too big."""


class ManifestError(MoaError, ValueError):
    """A mixture manifest (``moa_mixture.json``) that is missing, malformed or inconsistent."""


class RegistryError(MoaError, ValueError):
    """A registry entry that does not match its schema, or a name the registry does not list."""


# --- base models -------------------------------------------------------------------------


class BaseModelError(MoaError, OSError):
    """A base model that cannot be found, converted or loaded."""


class UnsupportedQuantizationError(MoaError, ValueError):
    """A ``quantization`` value that moa cannot load a base model with."""


__all__ = [
    "AdapterConfigError",
    "AdapterError",
    "AdapterExistsError",
    "AdapterFormatError",
    "AdapterNameError",
    "AdapterShapeError",
    "BackendUnavailableError",
    "BaseModelError",
    "BaseModelMismatchError",
    "HubError",
    "InputLimitError",
    "IntegrityError",
    "ManifestError",
    "MissingDependencyError",
    "MoaError",
    "NonFiniteOutputError",
    "PluginConflictError",
    "PluginError",
    "RegistryError",
    "RoutingError",
    "TargetModuleError",
    "UnsafeFileError",
    "UnknownAdapterError",
    "UnknownPluginError",
    "UnsupportedQuantizationError",
    "format_choices",
]
