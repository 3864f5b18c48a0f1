"""The residency key of a request: what a replica must hold to serve it without loading.

Several engine replicas (``moa serve --backend ray``, :mod:`moa.serve.ray_app`) each hold a
few adapters; a request is best served by a replica that already holds what it needs. Its
*residency key* names that, from the request's ``model`` and ``adapter_weights`` fields as
:mod:`moa.serve.model_names` reads them:

* a named adapter (``"sql"``, ``"<base>:sql"``, or ``adapter_weights`` with one positive
  weight) -> ``"sql"``;
* a mixture (``adapter_weights`` with several positive weights) -> its adapters sorted and
  joined by ``+`` (``"code+sql"``): the weights do not change what must be resident, so every
  mixture of the same adapters shares a key;
* ``auto`` -> ``"auto@<router id>"``, the router's id (a digest of its files): the router's
  adapters are pinned on every replica, and its key keeps ``auto`` traffic together;
* the base alone, or anything the key cannot be read from (a bad body, an unknown field
  type) -> ``""``: no affinity; the replica answers the error as ``moa serve`` does.

Adapter names are letters, digits, ``_`` and ``-`` (:func:`moa.model.adapter_bank.check_adapter_name`;
an invalid one gives ``""``), so a key is unambiguous and :func:`key_adapters` reads the adapters back from it.

Example::

    residency_key({"model": "tiny:sql"}, served_model_name="tiny")          # 'sql'
    residency_key({"model": "tiny", "adapter_weights": {"sql": 0.7, "code": 0.3}},
                  served_model_name="tiny")                                 # 'code+sql'
    key_adapters("code+sql")                                                # ('code', 'sql')
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moa.errors import AdapterNameError
from moa.model.adapter_bank import check_adapter_name
from moa.serve.requests import AUTO

#: Separator of a mixture's adapters in its key.
MIXTURE_SEPARATOR = "+"
#: Prefix of the key of ``auto`` requests (followed by the router's id).
AUTO_PREFIX = f"{AUTO}@"
#: Hex digits of the router digest kept in the key.
ROUTER_ID_DIGITS = 12


def residency_key(body: Any, *, served_model_name: str, router_id: str | None = None) -> str:
    """The residency key of a completion or chat request body (see the module docstring).

    Args:
        body: The request's JSON body, parsed (anything else gives ``""``).
        served_model_name: The base's name in the API (``--served-model-name``).
        router_id: The served router's id (:func:`router_id`); ``None``: no router, and
            ``auto`` requests get ``""`` (the replica refuses them with 400).

    Returns:
        The key; ``""`` when the request needs no adapter or its key cannot be read.
    """
    if not isinstance(body, Mapping):
        return ""
    weights = body.get("adapter_weights")
    if weights is not None:
        if not isinstance(weights, Mapping):
            return ""
        return _mixture_key(weights)
    model = body.get("model")
    if not isinstance(model, str) or not model or model == served_model_name:
        return ""
    if model == AUTO:
        return f"{AUTO_PREFIX}{router_id}" if router_id else ""
    base, sep, adapter = model.partition(":")
    if sep:
        return adapter if base == served_model_name and _plain_name(adapter) else ""
    return model if _plain_name(model) else ""


def key_adapters(key: str) -> tuple[str, ...]:
    """The adapters a replica must hold for ``key`` (none for ``""`` and ``auto``'s key,
    whose adapters are the router's, pinned on every replica)."""
    if not key or key.startswith(AUTO_PREFIX):
        return ()
    return tuple(key.split(MIXTURE_SEPARATOR))


def router_id(folder: str | os.PathLike | None) -> str | None:
    """A short digest of a router folder's files (names and bytes): equal routers share it.

    Returns:
        ``None`` for ``None`` (no router).
    """
    if folder is None:
        return None
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:ROUTER_ID_DIGITS]


def _mixture_key(weights: Mapping[Any, Any]) -> str:
    used = []
    for name, weight in weights.items():
        if not isinstance(name, str) or not _plain_name(name):
            return ""
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            return ""
        if weight > 0:
            used.append(name)
    return MIXTURE_SEPARATOR.join(sorted(set(used)))


def _plain_name(name: str) -> bool:
    """Whether ``name`` is a valid adapter name (so it holds no separator of a key)."""
    try:
        check_adapter_name(name)
    except AdapterNameError:
        return False
    return True
