"""Reading input-level adapter folders (PEFT's PROMPT_TUNING, PREFIX_TUNING...) and writing them back.

The folder layout is PEFT's, as for every adapter: ``adapter_config.json`` and
``adapter_model.safetensors`` (for prompt-learning types, one tensor named
``prompt_embeddings``), plus moa's metadata (base fingerprint, adapter type, version) in the
safetensors header and ``moa.json``. Which folders are input-level is decided by the
``peft_type`` of their config: the type registered for it through the
``moa_input_adapter_types`` hook reads it; every other folder is a Linear-level adapter
(:mod:`moa.model.adapter_io`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import moa
from moa.adapters.file_checks import read_json_file
from moa.adapters.input_level import InputAdapter
from moa.adapters.peft_format import (
    CONFIG_NAME,
    FINGERPRINT_KEY,
    WEIGHTS_NAME,
    portable_base_model_name,
    read_adapter_folder,
    write_adapter_folder,
)
from moa.errors import AdapterConfigError, BaseModelMismatchError, MoaError

if TYPE_CHECKING:
    from moa.model.mixture_model import MixtureModel


def read_input_adapter(model: MixtureModel, folder: str | os.PathLike) -> InputAdapter | None:
    """Build (not install) the input-level adapter saved in ``folder``; ``None`` if it is not one.

    Raises:
        AdapterFormatError: unreadable folder or weights.
        BaseModelMismatchError: moa saved it against a base with another fingerprint.
        AdapterConfigError: options its type cannot honour.
        AdapterShapeError: a tensor whose shape does not fit the config and this base.
    """
    from moa.plugin import input_adapter_type_for_peft_type

    path = Path(folder)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        return None  # the Linear-level reader says what is missing
    spec = input_adapter_type_for_peft_type(read_json_file(config_path, folder=path).get("peft_type"))
    if spec is None:
        return None
    files = read_adapter_folder(path)
    saved = files.base_fingerprint
    if saved and saved != model.base_fingerprint:
        raise BaseModelMismatchError(
            f"Adapter {str(folder)!r} was made for another base (fingerprint {saved}); this model's base is "
            f"{getattr(model.config, '_name_or_path', '?')!r} (fingerprint {model.base_fingerprint}). Load it on "
            f"the base it was trained on."
        )
    where = f"{CONFIG_NAME} of {str(folder)!r}"
    try:
        config = spec.config_class.from_dict(files.config)
        adapter = model.input_adapters.build(spec, config, model.base_model)
    except MoaError as error:
        raise type(error)(f"{where}: {error}") from error
    except (TypeError, ValueError, KeyError, AttributeError, re.error, OverflowError) as error:
        raise AdapterConfigError(
            f"{where} holds a value its adapter type cannot use ({type(error).__name__}: {error}). Fix that field "
            f"or re-save the adapter."
        ) from error
    try:
        adapter.load_peft_state_dict(files.tensors)
    except MoaError as error:
        raise type(error)(f"{WEIGHTS_NAME} of {str(folder)!r}: {error}") from error
    return adapter


def write_input_adapter(model: MixtureModel, adapter_name: str, directory: str | os.PathLike) -> Path:
    """Save the input-level adapter ``adapter_name`` as a PEFT folder (atomically)."""
    from moa.model.base_loading import base_hub_id, describe_base

    adapter = model.input_adapters.get(adapter_name)
    config = adapter.config
    config_dict = config.to_dict()
    base = describe_base(model.base_model)
    # The base's Hub id rather than a path on this machine, so PEFT's AutoPeftModel loads it anywhere.
    config_dict["base_model_name_or_path"] = portable_base_model_name(
        config.base_model_name_or_path, base.get("name_or_path"), base_hub_id(model.base_model)
    )
    metadata = {
        FINGERPRINT_KEY: model.base_fingerprint,
        "moa.adapter_type": config.adapter_type,
        "moa.version": moa.__version__,
    }
    moa_metadata = {"moa_version": moa.__version__, "adapter_type": config.adapter_type, "base": base}
    return write_adapter_folder(directory, config_dict, adapter.peft_state_dict(), metadata, moa_metadata)


__all__ = ["read_input_adapter", "write_input_adapter"]
