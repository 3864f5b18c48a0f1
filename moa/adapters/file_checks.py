"""Checks on the files moa reads from an adapter or router folder, before anything is loaded.

Every reader of a folder (adapters, routers, manifests) goes through these, so a hostile or
corrupt file gives one clear :class:`~moa.errors.MoaError` naming the file and the field:

* :func:`check_inside_folder`: a file that is a symlink pointing outside its folder (or that
  is not a regular file: a FIFO would block the read) is refused. A Hugging Face cache
  snapshot's links into its repo's ``blobs/`` are allowed.
* :func:`read_json_file`: size cap, UTF-8, JSON, a JSON object, no ``trust_remote_code``.
* :func:`check_safetensors_header`: the safetensors header parsed and checked field by field
  (header length, ``dtype``, ``shape``, ``data_offsets``, ``__metadata__``) without reading
  any tensor, so a damaged file never reaches the safetensors library's own errors.
* :func:`check_finite`: tensors holding NaN or infinities are refused.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from moa.errors import AdapterFormatError, AdapterShapeError, MoaError, UnsafeFileError

#: Largest JSON config file read (an adapter or router config is a few KiB).
MAX_JSON_BYTES = 16 * 1024 * 1024
#: Largest safetensors header accepted (the safetensors library's own cap).
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Bytes per element of every dtype the safetensors format defines (sub-byte types left out).
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
#: The floating-point dtypes, the only ones adapter weights may have.
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2")


def check_inside_folder(folder: Path, path: Path, error_class: type[MoaError] = UnsafeFileError) -> None:
    """Refuse ``path`` (a file of ``folder``) if it links outside ``folder`` or is not a regular file.

    Links of a Hugging Face cache snapshot (``models--o--n/snapshots/<commit>/x`` ->
    ``../../blobs/<hash>``, also from subfolders of a snapshot) stay inside the repo's cache
    folder and are allowed.

    Raises:
        UnsafeFileError: a symlink whose target is outside the folder (e.g. ``/etc/passwd``).
        error_class: the path exists but is not a regular file (a FIFO, a device, a folder).
    """
    if not path.exists() and not path.is_symlink():
        return
    folder_real = folder.resolve()
    target = path.resolve()
    allowed = [folder_real]
    for snapshot in (folder_real, *folder_real.parents):  # the folder may be a subfolder of a snapshot
        if snapshot.parent.name == "snapshots" and snapshot.parent.parent.name.startswith("models--"):
            allowed.append(snapshot.parent.parent / "blobs")
            break
    if path.is_symlink() and not any(target.is_relative_to(root) for root in allowed):
        raise UnsafeFileError(
            f"Refusing {str(path)!r}: it is a symlink to {str(target)!r}, outside the folder {str(folder)!r}. "
            f"moa reads only files inside an adapter or router folder. Replace the link with the file itself."
        )
    if not target.is_file():
        raise error_class(
            f"Refusing {str(path)!r}: it is not a regular file (a folder, device or pipe). Put the file itself there."
        )


def refuse_remote_code(document: Any, source: str) -> None:
    """Raise :class:`UnsafeFileError` if a config document asks for ``trust_remote_code``.

    moa never imports or runs code that comes with an adapter, router or mixture.
    """
    if isinstance(document, Mapping) and document.get("trust_remote_code") not in (None, False):
        raise UnsafeFileError(
            f"{source}: field trust_remote_code = {document.get('trust_remote_code')!r} is refused: moa never runs "
            f"code shipped with an adapter, router or mixture. Remove the field (adapters and routers are "
            f"data: a config and safetensors weights)."
        )


def read_json_file(path: Path, error_class: type[MoaError] = AdapterFormatError, *, folder: Path | None = None) -> Any:
    """Parse a JSON config file; every failure is ``error_class`` naming the file.

    Args:
        path: The file.
        error_class: The error to raise for an unreadable, oversized or non-object file.
        folder: The folder ``path`` belongs to: checked with :func:`check_inside_folder` first.

    Returns:
        The JSON object (a dict).

    Raises:
        error_class: too big, not UTF-8, not JSON, not an object.
        UnsafeFileError: a link outside ``folder``, or ``trust_remote_code`` set.
    """
    if folder is not None:
        check_inside_folder(folder, path, error_class)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise error_class(f"{str(path)!r} is {size} bytes, above the {MAX_JSON_BYTES}-byte cap of a JSON config. "
                          f"It is not a moa/PEFT config: restore or re-save it.")
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise error_class(f"{str(path)!r} is not valid JSON ({type(error).__name__}: {error}). "
                          f"Restore or re-save it.") from error
    if not isinstance(document, dict):
        raise error_class(f"{str(path)!r} must hold a JSON object, not {type(document).__name__}. "
                          f"Restore or re-save it.")
    refuse_remote_code(document, repr(str(path)))
    return document


def check_config_ranks(config: Mapping[str, Any], max_rank: int, source: str) -> None:
    """Check ``r``, ``init_r`` and every ``rank_pattern`` value of an adapter config against ``max_rank``.

    Runs before any layer is built, so a hostile ``r`` never allocates anything. A config with
    ``init_r`` (AdaLoRA's) allocates that rank and leaves ``r`` unused, so ``init_r`` is checked
    instead; its ``rank_pattern`` values are keep-masks (lists of booleans) over that rank,
    checked by their length.

    Raises:
        AdapterShapeError: a rank above the cap, or one that is not a positive integer.
    """
    ranks: list[tuple[str, Any]] = []
    key = "init_r" if "init_r" in config else "r"
    if key in config:
        ranks.append((key, config[key]))
    pattern = config.get("rank_pattern") or {}
    if isinstance(pattern, Mapping):
        for key, value in pattern.items():
            if isinstance(value, list) and value and all(isinstance(keep, bool) for keep in value):
                ranks.append((f"len(rank_pattern[{key!r}])", len(value)))
            else:
                ranks.append((f"rank_pattern[{key!r}]", value))
    for where, value in ranks:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise AdapterShapeError(f"{source}: field {where} = {str(value)[:40]!r} is not a positive integer "
                                    f"(a LoRA rank). Fix it or re-save the adapter.")
        if value > max_rank:
            raise AdapterShapeError(
                f"{source}: field {where} = {value}, above the rank cap {max_rank} (max_rank={max_rank}). Nothing was "
                f"loaded. Pass a higher max_rank (MixtureModel.from_pretrained(..., max_rank=...)) if you "
                f"trust this adapter."
            )


def _header_problem(header: Any, data_size: int, float_only: bool) -> str | None:
    """What is wrong with a parsed safetensors header (naming the tensor and field), or ``None``."""
    if not isinstance(header, dict):
        return f"the header is a JSON {type(header).__name__}, not an object"
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return f"__metadata__ must map strings to strings; got {str(metadata)[:80]}"
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            return f"tensor {name!r} must have exactly dtype, shape and data_offsets; got {str(info)[:80]}"
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        choices = FLOAT_DTYPES if float_only else tuple(DTYPE_BYTES)
        if dtype not in choices:
            return f"tensor {name!r} has dtype {str(dtype)[:20]!r}; choices: {', '.join(choices)}"
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            return f"tensor {name!r} has shape {str(shape)[:40]}, not a list of integers >= 0"
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            return f"tensor {name!r} has data_offsets {str(offsets)[:40]} outside the data ({data_size} bytes)"
        need = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != need:
            return (f"tensor {name!r}: shape {shape} of dtype {dtype} needs {need} bytes but data_offsets "
                    f"{offsets} span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for start, end, name in sorted(spans):
        if start != position:
            return f"tensor {name!r} has data_offsets [{start}, {end}]: they overlap or leave a gap at byte {position}"
        position = end
    if position != data_size:
        return f"the tensors' data_offsets end at byte {position} but the data holds {data_size} bytes"
    return None


def check_safetensors_header(
    path: Path, error_class: type[MoaError] = AdapterFormatError, *, float_only: bool = False
) -> dict[str, Any]:
    """Parse and check a safetensors header without reading tensors; return it.

    Args:
        path: The file.
        error_class: The error raised for a damaged file.
        float_only: Accept floating-point tensors only (adapter weights).

    Returns:
        The header: tensor name -> ``{"dtype", "shape", "data_offsets"}``, plus ``__metadata__``.

    Raises:
        error_class: naming the file and what is wrong (header length, dtype, shape, data_offsets).
    """
    size = path.stat().st_size
    problem = None
    header: Any = None
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            problem = f"it is {size} bytes, too short for the 8-byte header length"
        else:
            (length,) = struct.unpack("<Q", head)
            if length < 2 or length > min(MAX_HEADER_BYTES, size - 8):
                problem = f"its header length is {length}, which does not fit the {size}-byte file"
            else:
                try:
                    header = json.loads(handle.read(length).decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError) as error:
                    problem = f"its header is not valid JSON ({type(error).__name__}: {error})"
                else:
                    problem = _header_problem(header, size - 8 - length, float_only)
    if problem:
        raise error_class(
            f"{str(path)!r} is not a readable safetensors file: {problem}. It may be truncated or corrupt: "
            f"download or save it again."
        )
    return header


def check_finite(tensors: Mapping[str, torch.Tensor], source: str, error_class: type[MoaError] = AdapterFormatError
                 ) -> None:
    """Raise ``error_class`` naming the first floating-point tensor holding NaN or an infinity."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise error_class(
                f"{source}: tensor {name!r} holds NaN or infinite values; the file is corrupt (or the training "
                f"diverged). Nothing was loaded. Download or save it again."
            )


__all__ = [
    "DTYPE_BYTES",
    "FLOAT_DTYPES",
    "MAX_HEADER_BYTES",
    "MAX_JSON_BYTES",
    "check_config_ranks",
    "check_finite",
    "check_inside_folder",
    "check_safetensors_header",
    "read_json_file",
    "refuse_remote_code",
]
