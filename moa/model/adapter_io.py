"""Reading adapter folders into a MixtureModel's layers, and writing them back (PEFT layout)."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import moa
from moa.adapters.base import AdapterConfig, AdapterLayer
from moa.adapters.file_checks import check_config_ranks
from moa.adapters.magnitude import check_gain, check_layer_gains, compute_dtype
from moa.adapters.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterFiles,
    FINGERPRINT_KEY,
    peft_key,
    portable_base_model_name,
    read_adapter_folder,
    split_peft_key,
    split_shared_tensors,
    write_adapter_folder,
)
from moa.errors import (
    AdapterConfigError,
    AdapterFormatError,
    BaseModelMismatchError,
    MoaError,
    TargetModuleError,
    UnknownPluginError,
    format_choices,
)
from moa.model.targets import linear_features, linear_module_names, module_suffixes

if TYPE_CHECKING:
    from moa.model.mixture_model import MixtureModel


def read_adapter(model: MixtureModel, folder: str | os.PathLike) -> tuple[AdapterConfig, dict[str, AdapterLayer]]:
    """Build (but do not install) the layers of an adapter folder, checking everything.

    Hub repos are fetched (and verified) by the caller first: ``MixtureModel.load_adapter``.

    Raises:
        AdapterFormatError: unreadable folder, corrupt weights, unexpected tensor names.
        BaseModelMismatchError: saved against a base with another fingerprint.
        AdapterConfigError: options this adapter type cannot honour.
        TargetModuleError: a tensor for a module this base does not have (or not linear).
        AdapterShapeError: a tensor whose shape does not fit its module.
    """
    files = read_adapter_folder(folder)
    where = f"{CONFIG_NAME} of {str(folder)!r}"
    try:
        return _build_layers(model, folder, files)
    except (AdapterConfigError, UnknownPluginError) as error:
        raise _naming(error, where) from error
    except MoaError as error:  # about the tensors: name the weights file
        raise _naming(error, f"{WEIGHTS_NAME} of {str(folder)!r}") from error
    except (TypeError, ValueError, KeyError, AttributeError, re.error, OverflowError) as error:
        # a plugin's config class that does not check its values itself
        raise AdapterConfigError(
            f"{where} holds a value its adapter type cannot use ({type(error).__name__}: {error}). "
            f"Fix that field or re-save the adapter."
        ) from error


def _naming(error: MoaError, where: str) -> MoaError:
    """``error`` again, its message prefixed with ``where`` (the file) unless it names it already."""
    message = str(error)
    return error if where in message else type(error)(f"{where}: {message}")


def _build_layers(model: MixtureModel, folder: str | os.PathLike, files: AdapterFiles
                  ) -> tuple[AdapterConfig, dict[str, AdapterLayer]]:
    from moa.plugin import adapter_type_for_config

    saved_fingerprint = files.base_fingerprint
    if saved_fingerprint and saved_fingerprint != model.base_fingerprint:
        base_info = files.moa.get("base", {})
        saved_base = base_info.get("name_or_path") or files.config.get("base_model_name_or_path")
        raise BaseModelMismatchError(
            f"Adapter {str(folder)!r} was made for base {saved_base!r} (fingerprint "
            f"{saved_fingerprint}), but this model's base is "
            f"{getattr(model.config, '_name_or_path', '?')!r} (fingerprint {model.base_fingerprint}). "
            f"Load it on the base it was trained on."
        )
    peft_type = files.config.get("peft_type")
    if not isinstance(peft_type, str):
        raise AdapterConfigError(
            f"{CONFIG_NAME} of {str(folder)!r} has no 'peft_type' (got {peft_type!r}); "
            f"it is not a PEFT adapter config."
        )
    # Ranks are checked against the cap before any layer is built: a hostile r=10**9 must not allocate.
    check_config_ranks(files.config, model.max_rank, f"{CONFIG_NAME} of {str(folder)!r}")
    # A type whose config class accepts() this config (DoRA: LORA + use_dora) wins over
    # the type registered for its peft_type (see MoaPluginManager.adapter_type_for_config).
    spec = adapter_type_for_config(files.config)
    config = spec.config_class.from_dict(files.config)
    suffixes = spec.layer_class.peft_suffixes
    # Adapter-level tensors (one per adapter, e.g. VeRA's projections) belong to no module.
    shared, per_module = split_shared_tensors(files.tensors, spec.layer_class.shared_peft_keys)
    by_module: dict[str, dict[str, object]] = defaultdict(dict)
    for key, tensor in per_module.items():
        parsed = split_peft_key(key, suffixes)
        if parsed is None:
            raise AdapterFormatError(
                f"Tensor {key!r} in {str(folder)!r} is not a {spec.name} tensor (expected "
                f"names ending in {format_choices(suffixes)})."
            )
        module_name, suffix = parsed
        by_module[module_name][suffix] = tensor
    if not by_module:
        raise AdapterFormatError(f"{str(folder)!r} holds no adapter tensors.")
    linear = {n.replace(".base_layer", "") for n in linear_module_names(model.base_model)}
    linear |= {layer.module_name for layer in model.mixture_layers()}
    for module_name, tensors in by_module.items():
        if module_name not in linear:
            raise TargetModuleError(
                f"The adapter has weights for module {module_name!r}, which is not a linear layer of "
                f"this base. Its linear modules end in: "
                f"{format_choices(module_suffixes(sorted(linear)))}. Was it made for another base?"
            )
    layers: dict[str, AdapterLayer] = {}
    for module_name, tensors in sorted(by_module.items()):
        layer = spec.layer_class(config, module_name, *linear_features(model.bank.base_layer(module_name)))
        layer.load_peft_state_dict(tensors)
        check_layer_gains(layer, {suffix: peft_key(module_name, suffix) for suffix in tensors},
                          repr(str(Path(folder) / WEIGHTS_NAME)))
        layers[module_name] = layer
    for key, tensor in shared.items():
        check_gain(key, tensor, repr(str(Path(folder) / WEIGHTS_NAME)), dtype=compute_dtype(tensor))
    spec.layer_class.load_shared_peft_state_dict(config, layers, shared)
    return config, layers


def write_adapter(model: MixtureModel, adapter_name: str, directory: str | os.PathLike) -> Path:
    """Save one adapter of ``model`` as a PEFT folder (atomically)."""
    from moa.model.base_loading import base_hub_id, describe_base

    config = model.peft_config[adapter_name]
    layers = model.adapter_layers(adapter_name)
    tensors = {
        peft_key(module_name, suffix): tensor
        for module_name, layer in layers.items()
        for suffix, tensor in layer.peft_state_dict().items()
    }
    tensors.update(_shared_tensors(config, layers))
    config_dict = config.to_dict()
    if config_dict.get("target_modules") in ("all-linear", None):
        # PEFT saves "all-linear" expanded, and None as the default modules it resolved to
        config_dict["target_modules"] = module_suffixes(sorted(layers))
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
    return write_adapter_folder(directory, config_dict, tensors, metadata, moa_metadata)


def _shared_tensors(config: AdapterConfig, layers: dict[str, AdapterLayer]) -> dict[str, object]:
    """The adapter-level tensors its layer class saves (``AdapterLayer.shared_peft_state_dict``)."""
    layer_classes = {type(layer) for layer in layers.values()}
    if len(layer_classes) != 1:
        return {}  # no layers, or layers of several classes: no single class owns adapter-level tensors
    layer_class = layer_classes.pop()
    shared = layer_class.shared_peft_state_dict(config, layers)
    unknown = sorted(set(shared) - set(layer_class.shared_peft_keys))
    if unknown:
        raise AdapterFormatError(
            f"{layer_class.__name__}.shared_peft_state_dict returned tensors {format_choices(unknown)} that are not "
            f"in its shared_peft_keys {format_choices(layer_class.shared_peft_keys)}; moa could not read them back. "
            f"List them in shared_peft_keys."
        )
    return dict(shared)
