"""PEFT's on-disk adapter layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor names are PEFT's (``base_model.model.<module>.lora_A.weight``) so each side
loads the other's folders. moa's own metadata (base fingerprint, adapter type, version)
goes into the safetensors header (str -> str) and an optional ``moa.json``; never pickle.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moa.adapters.file_checks import (
    check_finite,
    check_inside_folder,
    check_safetensors_header,
    read_json_file,
)
from moa.atomic import atomic_directory
from moa.errors import AdapterFormatError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MOA_METADATA_NAME = "moa.json"
PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin")
PEFT_PREFIX = "base_model.model."
FINGERPRINT_KEY = "moa.base_fingerprint"


@dataclass
class AdapterFiles:
    """The contents of one adapter folder.

    Attributes:
        config: ``adapter_config.json`` as a dict.
        tensors: PEFT tensor name -> tensor (CPU).
        metadata: the safetensors header metadata (str -> str).
        moa: ``moa.json`` as a dict (empty when absent, e.g. a PEFT-made folder).
        path: the folder read.
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    moa: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def base_fingerprint(self) -> str | None:
        """Fingerprint of the base the adapter was saved against, if moa saved it."""
        base = self.moa.get("base")
        return self.metadata.get(FINGERPRINT_KEY) or (base.get("fingerprint") if isinstance(base, dict) else None)


def peft_key(module_name: str, suffix: str) -> str:
    """PEFT's saved name of a tensor: ``base_model.model.<module>.<suffix>``."""
    return f"{PEFT_PREFIX}{module_name}.{suffix}"


def split_peft_key(key: str, suffixes: Sequence[str]) -> tuple[str, str] | None:
    """``(module name, suffix)`` of a PEFT tensor name, or ``None`` if no suffix fits.

    Accepts the saved form (``...q_proj.lora_A.weight``) and the in-memory form with an
    adapter name (``...q_proj.lora_A.default.weight``).
    """
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for suffix in suffixes:
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], suffix
        head, _, leaf = suffix.rpartition(".")
        if head:
            match = re.match(rf"^(.*)\.{re.escape(head)}\.[^.]+\.{re.escape(leaf)}$", name)
            if match:
                return match.group(1), suffix
    return None


def split_shared_tensors(
    tensors: Mapping[str, torch.Tensor], shared_keys: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate adapter-level tensors (named exactly as in ``shared_keys``) from per-module ones.

    Adapter-level tensors (VeRA's ``base_model.vera_A``) belong to no module, so they are
    not split by :func:`split_peft_key`; an adapter type names them in
    ``AdapterLayer.shared_peft_keys``.

    Args:
        tensors: Every tensor of an adapter file, by full name.
        shared_keys: The full names the adapter type declares as adapter-level.

    Returns:
        ``(shared, per_module)``, each in the order of ``tensors``.
    """
    shared_set = set(shared_keys)
    shared = {key: tensor for key, tensor in tensors.items() if key in shared_set}
    per_module = {key: tensor for key, tensor in tensors.items() if key not in shared_set}
    return shared, per_module


def is_local_path(text: str) -> bool:
    """Whether ``text`` names a local file system location (absolute, ``~``/``.``-relative, or existing)."""
    return (
        os.path.isabs(text) or text.startswith(("~", "./", "../", ".\\")) or "\\" in text
        or bool(re.match(r"^[A-Za-z]:", text)) or Path(text).expanduser().exists()
    )


def portable_base_model_name(
    configured: str | None, name_or_path: str | None, hub_id: str | None
) -> str | None:
    """The ``base_model_name_or_path`` to write into ``adapter_config.json``.

    PEFT writes the base's ``name_or_path``, which for a base loaded from a local folder is
    a path on this machine, so ``AutoPeftModelForCausalLM.from_pretrained(folder)`` fails
    anywhere else. When the base's Hub id is known it is written instead of a local path;
    a value set on the adapter config that is not a local path (e.g. another Hub id) is kept.

    Args:
        configured: ``config.base_model_name_or_path`` of the adapter (``None`` if unset).
        name_or_path: The base's ``config._name_or_path``.
        hub_id: The base's Hub id if known (``moa.model.base_loading.base_hub_id``), else ``None``.

    Returns:
        The Hub id, the configured value, or (no Hub id known) ``configured or name_or_path``.
    """
    if hub_id and (not configured or configured == name_or_path or is_local_path(configured)):
        return hub_id
    return configured or name_or_path or None


def write_adapter_folder(
    directory: str | os.PathLike,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    moa_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write an adapter folder atomically (replacing any folder at ``directory``)."""
    header = {"format": "pt", **(metadata or {})}
    with atomic_directory(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        write_safetensors(tmp / WEIGHTS_NAME, tensors, header)
        if moa_metadata:
            (tmp / MOA_METADATA_NAME).write_text(json.dumps(dict(moa_metadata), indent=2, sort_keys=True) + "\n")
    return Path(directory)


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Save ``tensors`` with ``metadata``, byte-for-byte reproducibly.

    safetensors writes header metadata in hash-map order, so saving the same weights twice
    would give different bytes; the header is rewritten with sorted metadata keys (tensor
    data untouched), so re-saving unchanged weights keeps every pinned sha256.
    """
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, dict(metadata))
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    if isinstance(header.get("__metadata__"), dict):
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    canonical = len(text).to_bytes(8, "little") + text + raw[8 + length :]
    if canonical != raw:
        path.write_bytes(canonical)


def read_adapter_folder(directory: str | os.PathLike) -> AdapterFiles:
    """Read an adapter folder, raising :class:`AdapterFormatError` for anything unusable.

    Nothing is loaded from a file that is a symlink out of the folder, a pickle, or a config
    asking for ``trust_remote_code`` (:class:`~moa.errors.UnsafeFileError`); ``moa.json``
    must be a JSON object whose ``base`` (if any) is an object.
    """
    path = Path(directory)
    if not path.is_dir():
        raise AdapterFormatError(
            f"Adapter folder {str(path)!r} does not exist. Give a folder holding {CONFIG_NAME} "
            f"and {WEIGHTS_NAME}, or a Hub repo id."
        )
    config_path = path / CONFIG_NAME
    if not config_path.exists() and not config_path.is_symlink():
        raise AdapterFormatError(
            f"{str(path)!r} has no {CONFIG_NAME}; it is not a PEFT adapter folder. Files there: "
            f"{sorted(p.name for p in path.iterdir())[:10]}."
        )
    config = read_json_file(config_path, folder=path)
    weights_path = path / WEIGHTS_NAME
    if not weights_path.exists() and not weights_path.is_symlink():
        pickles = [name for name in PICKLE_NAMES if (path / name).exists()]
        hint = (
            f" It has {pickles[0]}, a pickle, which moa refuses to load (pickles run code). "
            f"Re-save it with PEFT's save_pretrained(safe_serialization=True)."
            if pickles
            else ""
        )
        raise AdapterFormatError(f"{str(path)!r} has no {WEIGHTS_NAME}.{hint}")
    check_inside_folder(path, weights_path, AdapterFormatError)
    tensors, metadata = read_safetensors(weights_path, float_only=True)
    check_finite(tensors, repr(str(weights_path)))
    moa_path = path / MOA_METADATA_NAME
    moa_metadata: dict[str, Any] = {}
    if moa_path.exists() or moa_path.is_symlink():
        moa_metadata = read_json_file(moa_path, folder=path)
        for key in ("base", "adapter_type"):
            kind = dict if key == "base" else str
            if key in moa_metadata and not isinstance(moa_metadata[key], kind):
                raise AdapterFormatError(
                    f"{str(moa_path)!r}: field {key} = {str(moa_metadata[key])[:60]!r} must be a JSON "
                    f"{'object' if kind is dict else 'string'}. Re-save the adapter with moa (or delete {MOA_METADATA_NAME})."
                )
        fingerprint = moa_metadata.get("base", {}).get("fingerprint")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise AdapterFormatError(
                f"{str(moa_path)!r}: field base.fingerprint = {str(fingerprint)[:60]!r} must be a string. Re-save "
                f"the adapter with moa (or delete {MOA_METADATA_NAME})."
            )
    return AdapterFiles(config=config, tensors=tensors, metadata=metadata, moa=moa_metadata, path=path)


def read_safetensors(
    path: str | os.PathLike, *, float_only: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata of a safetensors file (corrupt -> AdapterFormatError).

    The header is checked field by field first (:func:`~moa.adapters.file_checks.check_safetensors_header`);
    ``float_only`` refuses tensors that are not floating point (adapter weights).
    """
    check_safetensors_header(Path(path), float_only=float_only)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types and OSError
        raise AdapterFormatError(
            f"{str(path)!r} is not a readable safetensors file ({type(error).__name__}: {error}). "
            f"It may be truncated or corrupt: download or save it again."
        ) from error
    return tensors, metadata
