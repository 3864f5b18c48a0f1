"""Loading the shared base model, dense or NF4 (bitsandbytes), and its fingerprint.

With ``quantization="nf4"`` every ``nn.Linear`` except ``lm_head`` becomes a bitsandbytes
``Linear4bit`` (NF4, double quant), as transformers/QLoRA do, on CUDA or CPU: through
transformers' ``BitsAndBytesConfig`` (needs ``accelerate``), else by replacing the layers
directly (:func:`quantize_nf4_`, bit-identical result).

CPU note: on AVX512-BF16 CPUs bitsandbytes repacks a ``Linear4bit`` at its first no-grad
eval forward into a bf16 layout whose kernel has no autograd (training through it then
silently gets no input gradient) and which is slower for batched prefill. ``load_base``
turns that path off; :func:`set_cpu_packed_nf4` turns it on for faster 1-token decoding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moa import compat
from moa.bnb_hint import install_kernel_hint_filter
from moa.errors import BaseModelError, MissingDependencyError, UnsupportedQuantizationError
from moa.model.default_base import (
    DEFAULT_BASE_ID,
    MARKER_FILENAME,
    default_base_dir,
    default_base_path,
    moa_home,
)
from moa.model.nf4_cache import load_cached_nf4
from moa.model.nf4_compute import default_nf4_compute_dtype, set_nf4_compute_dtype
from moa.model.targets import is_quantized_linear, linear_features

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)
install_kernel_hint_filter()  # before anything (transformers, PEFT) imports bitsandbytes

QUANTIZATION_CHOICES: tuple[str | None, ...] = ("nf4", None)
"""Values ``load_base`` accepts for ``quantization``."""

FINGERPRINT_CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
    "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json",
)  # fmt: skip
"""File names that make a local base folder count as having a tokenizer (any one of them)."""
TOKENIZER_FILE_PATTERNS = ("*.tiktoken", "tokenizer*.json", "vocab.*")
_WRAPPED_CHILD = "base_layer"  # PEFT's (and moa's) name for the wrapped original module
_PEFT_PREFIX = "base_model.model."


# --- resolving and loading ---------------------------------------------------------------


def resolve_base(base: str | os.PathLike[str]) -> str:
    """Turn a ``base`` argument into something ``from_pretrained`` can load.

    Args:
        base: ``"default"`` (the embedded SmolLM2-135M-Instruct), a local model folder,
            or a Hugging Face Hub id already in the local HF cache.

    Returns:
        A local folder path, or the Hub id unchanged (it is checked when loading).

    Raises:
        BaseModelError: ``base`` looks like a path (or is a ``PathLike``) but is no folder.
    """
    if isinstance(base, str) and base == "default":
        return str(default_base_path())
    path = Path(os.fspath(base)).expanduser()
    if path.is_dir():
        return str(path)
    text = os.fspath(base)
    is_hub_id = isinstance(base, str) and text.strip() and text.count("/") <= 1 and not path.exists()
    if not is_hub_id or text.startswith((".", "/", "~")) or "\\" in text:
        raise BaseModelError(
            f"Base model {text!r} is not an existing local folder"
            f"{' (it is a file)' if path.is_file() else ''}. Pass base='default' for the embedded "
            "SmolLM2-135M-Instruct, a folder with config.json + model weights + tokenizer, "
            "or a Hub id (org/name) already in the local Hugging Face cache."
        )
    return text


def load_base(
    base: str | os.PathLike[str] = "default",
    quantization: str | None = "nf4",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a frozen base causal LM and its tokenizer, dense or NF4-quantized.

    An NF4 base is quantized once and kept pre-quantized in ``MOA_HOME`` (see
    :mod:`moa.model.nf4_cache`); later loads read that copy and never the dense weights.

    Args:
        base: ``"default"``, a local model folder, or a Hub id in the local HF cache
            (moa never downloads base weights).
        quantization: ``"nf4"`` (bitsandbytes 4-bit NF4 with double quantization for every
            ``nn.Linear`` except ``lm_head``) or ``None`` (dense).
        device: Where to put the model; default CUDA if available, else CPU.
        dtype: Dtype of the dense parameters; default float32 on CPU and bfloat16 on CUDA.
        compute_dtype: Dtype the NF4 layers compute in; default ``dtype`` (or
            ``MOA_NF4_COMPUTE_DTYPE``). ``torch.bfloat16`` makes an NF4 decode step on a CPU
            with native bf16 about as fast as the dense base's, at bf16 precision (see
            :mod:`moa.model.nf4_compute`). Ignored for a dense base.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, every parameter has
        ``requires_grad=False`` and ``config.use_cache`` is True. ``tokenizer`` is ``None``
        for a local folder without tokenizer files (logged at DEBUG).

    Raises:
        UnsupportedQuantizationError: ``quantization`` is not one of ``QUANTIZATION_CHOICES``.
        BaseModelError: The base cannot be found or loaded.
        MissingDependencyError: ``bitsandbytes`` (for NF4) or the default base's packages
            are missing.
    """
    quant = _normalise_quantization(quantization)
    dev = _resolve_device(device)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    path = resolve_base(base)
    refuse_custom_code(path)
    # never run code shipped with a base (transformers would otherwise ask, or fail later)
    extra: dict[str, Any] = {"trust_remote_code": False}
    if not Path(path).is_dir():
        extra["local_files_only"] = True
    start = time.perf_counter()
    tokenizer = _load_tokenizer(path, base, extra)
    if quant is None:
        model = _from_pretrained(path, base, dtype=dtype, **extra).to(dev)
    else:
        model = _load_nf4(path, base, dev, dtype, extra)
    model.eval()
    model.requires_grad_(False)
    model.config.use_cache = True
    if quant is not None:
        set_cpu_packed_nf4(model, False)
        set_nf4_compute_dtype(model, compute_dtype or default_nf4_compute_dtype(dev, dtype))
    elapsed = time.perf_counter() - start
    logger.info("Loaded base %s (%s, %s, %s) in %.2f s.", path, quant or "dense", dev, dtype, elapsed)
    return model, tokenizer


def _normalise_quantization(quantization: object) -> str | None:
    if quantization is None:
        return None
    if isinstance(quantization, str) and quantization.strip().lower() in ("nf4", "none"):
        value = quantization.strip().lower()
        return None if value == "none" else value
    raise UnsupportedQuantizationError(
        f"Unknown quantization {quantization!r}. Choices: 'nf4' (bitsandbytes 4-bit NF4) or None "
        "(dense). Pass quantization='nf4' or quantization=None."
    )


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BaseModelError(f"Unknown device {device!r}. Use 'cpu', 'cuda' or 'cuda:N'.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BaseModelError(f"Device {device!r} asked for, but CUDA is not available here. Use device='cpu'.")
    return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev


def _not_loadable(base: object, path: str, what: str, exc: BaseException) -> BaseModelError:
    if Path(path).is_dir():
        return BaseModelError(
            f"Could not load the {what} of base model {os.fspath(base)!r} from the local folder {path!r}: "
            f"{type(exc).__name__}: {exc}. The folder needs config.json and model weights (safetensors) as "
            "written by save_pretrained, and, if it has tokenizer files, a complete tokenizer (without any "
            "tokenizer file it loads with tokenizer=None); or pass base='default'."
        )
    return BaseModelError(
        f"Base model {path!r} is neither an existing local folder nor a Hub id in the local Hugging Face "
        f"cache ({what} failed: {type(exc).__name__}). moa never downloads base weights. Pass "
        f"base='default' for the embedded SmolLM2-135M-Instruct, a local folder, or fetch it first "
        f"with: huggingface-cli download {path}"
    )


def has_tokenizer_files(folder: str | os.PathLike[str]) -> bool:
    """Whether a local model folder holds any tokenizer file (``tokenizer.json``, ``vocab.*``...)."""
    path = Path(folder)
    return any((path / name).is_file() for name in TOKENIZER_FILES) or any(
        child.is_file() for pattern in TOKENIZER_FILE_PATTERNS for child in path.glob(pattern)
    )


def _load_tokenizer(path: str, base: object, extra: dict[str, Any]) -> PreTrainedTokenizerBase | None:
    """The base's tokenizer; ``None`` for a local folder without tokenizer files.

    A folder that has tokenizer files which do not load is an error (never silently no tokenizer).
    """
    from transformers import AutoTokenizer

    if Path(path).is_dir() and not has_tokenizer_files(path):
        logger.debug(
            "Base folder %s has no tokenizer files (%s): loading it without a tokenizer (tokenizer=None); "
            "pass token ids, or text only after setting model.tokenizer.", path, ", ".join(TOKENIZER_FILES[:3]),
        )
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    except (OSError, ValueError, KeyError) as exc:
        raise _not_loadable(base, path, "tokenizer", exc) from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def refuse_custom_code(path: str | os.PathLike[str]) -> None:
    """Raise :class:`BaseModelError` if a local base folder's ``config.json`` asks to run its own code.

    A config with ``auto_map`` (model classes in ``.py`` files of the folder) or
    ``trust_remote_code`` is refused before anything is loaded: moa never runs code that comes
    with a model.
    """
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as error:
        raise BaseModelError(f"{str(config_path)!r} is not valid JSON ({error}). Restore the base folder.") from error
    if not isinstance(config, dict):
        raise BaseModelError(f"{str(config_path)!r} must hold a JSON object. Restore the base folder.")
    for key in ("auto_map", "trust_remote_code"):
        if config.get(key) not in (None, False, {}):
            raise BaseModelError(
                f"{str(config_path)!r}: field {key} = {str(config[key])[:80]!r} asks to run code shipped with the "
                f"model (trust_remote_code), which moa never does. Use a base whose architecture transformers "
                f"ships (Llama, Mistral, Qwen2...), or remove {key} if the architecture is a standard one."
            )


def _from_pretrained(path: str, base: object, **kwargs: Any) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise _not_loadable(base, path, "model", exc) from exc


def _load_nf4(
    path: str, base: object, dev: torch.device, dtype: torch.dtype, extra: dict[str, Any]
) -> PreTrainedModel:
    """The NF4 model: its pre-quantized copy from the cache, written by :func:`_quantize_on_load` the first time."""
    import_bitsandbytes()

    def load_copy(folder: str) -> PreTrainedModel:
        model = _from_pretrained(folder, base, dtype=dtype, device_map={"": str(dev)}, **extra)
        # the base it is, not the cache folder: adapters and model cards record this name
        model.config.name_or_path = model.name_or_path = path
        return model

    return load_cached_nf4(path, dtype, lambda: _quantize_on_load(path, base, dev, dtype, extra), load_copy)


def _quantize_on_load(
    path: str, base: object, dev: torch.device, dtype: torch.dtype, extra: dict[str, Any]
) -> PreTrainedModel:
    """NF4 via transformers' BitsAndBytesConfig; on refusal, quantize the dense model directly."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8,
    )  # fmt: skip
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=config, dtype=dtype, device_map={"": str(dev)}, **extra
        )
    except OSError as exc:
        raise _not_loadable(base, path, "model", exc) from exc
    except Exception as exc:  # noqa: BLE001 - any refusal falls back to direct quantization
        logger.info(
            "transformers did not load %s in NF4 (%s: %s); quantizing its Linear layers with bitsandbytes directly.",
            path, type(exc).__name__, exc,
        )
    model = _from_pretrained(path, base, dtype=dtype, **extra).to(dev)
    quantize_nf4_(model, compute_dtype=dtype, device=dev)
    return model


# --- bitsandbytes ------------------------------------------------------------------------


def import_bitsandbytes() -> ModuleType:
    """Import bitsandbytes, or raise :class:`MissingDependencyError` with the install command.

    bitsandbytes' import-time WARNING about its optional CPU kernel on the Hub
    ("kernels-community") goes to moa's log at DEBUG instead (see :mod:`moa.bnb_hint`).
    """
    install_kernel_hint_filter()
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    try:
        import bitsandbytes
    except ImportError as exc:
        raise MissingDependencyError(
            f"NF4 quantization needs the package 'bitsandbytes', which did not import ({exc}). "
            "Install it with: pip install bitsandbytes  (or load the base with quantization=None)."
        ) from exc
    return bitsandbytes


def quantize_nf4_(
    model: nn.Module,
    *,
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    skip_modules: tuple[str, ...] = ("lm_head",),
) -> int:
    """Replace every plain ``nn.Linear`` in ``model`` by an NF4 ``bnb.nn.Linear4bit``, in place.

    Same result as transformers' ``BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``.

    Args:
        model: The dense model (it is moved to ``device`` first).
        compute_dtype: Dtype the 4-bit layers compute in.
        device: Where the quantized weights live (quantization happens there).
        skip_modules: Module names (last component or full dotted name) left dense.

    Returns:
        The number of layers quantized.
    """
    bnb = import_bitsandbytes()
    dev = torch.device(device)
    model.to(dev)
    count = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full_name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is not nn.Linear or child_name in skip_modules or full_name in skip_modules:
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=compute_dtype,
                compress_statistics=True, quant_type="nf4", device="meta",
            )  # fmt: skip
            layer.weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=layer
            )
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            layer = layer.to(dev).requires_grad_(False)  # Params4bit quantizes on its first .to(device)
            setattr(parent, child_name, layer)
            count += 1
    logger.debug("Quantized %d Linear layers to NF4 on %s.", count, dev)
    return count


def set_cpu_packed_nf4(model: nn.Module, enabled: bool) -> int:
    """Switch bitsandbytes' CPU "packed" bf16 NF4 kernel on or off for every ``Linear4bit``.

    On: faster 1-token decoding on AVX512-BF16 CPUs (no-op elsewhere), bf16 accuracy, no input
    gradient once packed. Off (``load_base``'s choice): float32 dequantize+matmul, faster for
    batches, gradients flow; already packed weights are unpacked (absmax went through bf16).

    Args:
        model: Any module containing ``Linear4bit`` layers.
        enabled: Whether the packed kernel may be used.

    Returns:
        The number of ``Linear4bit`` layers visited.
    """
    if "bitsandbytes" not in sys.modules:
        return 0
    functional = sys.modules["bitsandbytes"].functional
    supported = bool(getattr(functional, "has_avx512bf16", lambda: False)())
    count = 0
    for module in model.modules():
        if not is_quantized_linear(module) or not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = supported and enabled
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if not enabled and getattr(state, "packing_format_for_cpu", False):
            unpack = compat.bnb_cpu_unpack()  # the inverse bnb uses itself
            weight.data, weight.quant_state = unpack(weight.data, state)
            module.quant_state = weight.quant_state
        count += 1
    return count


# --- fingerprint and description ---------------------------------------------------------


def _logical_shape(param: torch.Tensor) -> list[int]:
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    return [int(s) for s in (shape if shape is not None else param.shape)]


def _base_parameters(model: nn.Module) -> list[tuple[str, list[int]]]:
    """Sorted (name, logical shape) of the base's parameters: ``.base_layer`` parts dropped,
    a wrapper's other (adapter) parameters skipped."""
    wrappers = [name for name, mod in model.named_modules() if isinstance(getattr(mod, _WRAPPED_CHILD, None), nn.Module)]
    prefixes = [(f"{w}." if w else "", f"{w}.{_WRAPPED_CHILD}." if w else f"{_WRAPPED_CHILD}.") for w in wrappers]
    items = []
    for name, param in model.named_parameters():
        if any(name.startswith(own) and not name.startswith(kept) for own, kept in prefixes):
            continue  # a wrapper's own (adapter) parameter, not part of the base
        if name.startswith(_PEFT_PREFIX):
            name = name[len(_PEFT_PREFIX):]
        clean = ".".join(part for part in name.split(".") if part != _WRAPPED_CHILD)
        items.append((clean, _logical_shape(param)))
    return sorted(items)


def _text_config(model: nn.Module) -> Any:
    config = model.config
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def base_fingerprint(model: nn.Module) -> str:
    """A stable 24-hex-digit digest identifying a base model's architecture and tensors.

    Covers the key config sizes and every parameter's name and *logical* shape (NF4
    weights count with their unpacked shape), so the dense and NF4 loads of one base agree,
    dtype does not matter, and wrapping Linear layers (``x.base_layer``) changes nothing.

    Args:
        model: A transformers model (possibly with wrapped Linear layers).

    Returns:
        A lowercase hex string of length 24.
    """
    config = _text_config(model)
    sizes = {key: getattr(config, key, None) for key in FINGERPRINT_CONFIG_KEYS}
    payload = {"config": sizes, "parameters": _base_parameters(model)}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def detect_quantization(model: nn.Module) -> str | None:
    """Return ``"nf4"`` (or ``"fp4"``) if ``model`` holds bnb 4-bit layers, else ``None``."""
    for module in model.modules():
        if is_quantized_linear(module):
            return str(getattr(module.weight, "quant_type", "nf4"))
    return None


def describe_base(model: nn.Module) -> dict[str, Any]:
    """Describe a base model for adapter metadata (JSON-serialisable).

    Returns:
        ``model_id`` (the base's Hub id when known, see :func:`base_hub_id`, else
        ``config._name_or_path``), ``name_or_path``, ``model_type``, ``hidden_size``,
        ``num_hidden_layers``, ``vocab_size``, ``quantization`` (``"nf4"`` or ``None``)
        and ``fingerprint``.
    """
    config = _text_config(model)
    name_or_path = str(getattr(model.config, "_name_or_path", "") or "")
    return {
        "model_id": base_hub_id(model) or name_or_path,
        "name_or_path": name_or_path,
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "quantization": detect_quantization(model),
        "fingerprint": base_fingerprint(model),
    }


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")  # 'owner/name', as in registry/schema


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` reads as a Hub repo id (``owner/name``) and is not an existing local path."""
    return bool(_HUB_ID.match(text)) and ".." not in text and not Path(text).expanduser().exists()


def base_hub_id(model: nn.Module) -> str | None:
    """The Hugging Face Hub id of a base model, when its config says (or its folder shows) it.

    In order: the converted default base (:func:`moa.default_base_path`, wherever
    ``MOA_HOME`` puts it) is ``HuggingFaceTB/SmolLM2-135M-Instruct``; a folder holding
    moa's conversion marker (``moa_base.json``) names its ``model_id``; a folder inside the
    Hugging Face cache (``models--owner--name/snapshots/<rev>``) is ``owner/name``; a
    ``config._name_or_path`` that is itself a Hub id (loaded from the HF cache by id) is that.

    Args:
        model: A transformers model (its ``config._name_or_path`` is read).

    Returns:
        ``"owner/name"``, or ``None`` when the base is a local folder of unknown origin.
    """
    name_or_path = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if not name_or_path:
        return None
    if _same_path(name_or_path, default_base_dir()):
        return DEFAULT_BASE_ID
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return name_or_path if looks_like_hub_id(name_or_path) else None
    try:
        marker = json.loads((folder / MARKER_FILENAME).read_text())
    except (OSError, ValueError):
        marker = None
    model_id = marker.get("model_id") if isinstance(marker, dict) else None
    if isinstance(model_id, str) and looks_like_hub_id(model_id):
        return model_id
    parts = folder.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        repo_id = parts[-3][len("models--"):].replace("--", "/", 1)
        if _HUB_ID.match(repo_id):
            return repo_id
    return None


def _same_path(a: str, b: Path) -> bool:
    try:
        return Path(a).expanduser().resolve() == b.resolve()
    except (OSError, RuntimeError, ValueError):
        return False


__all__ = [
    "QUANTIZATION_CHOICES", "UnsupportedQuantizationError", "base_fingerprint", "base_hub_id",
    "default_base_path", "describe_base", "detect_quantization", "has_tokenizer_files", "import_bitsandbytes",
    "is_quantized_linear", "linear_features", "load_base", "looks_like_hub_id", "moa_home", "quantize_nf4_",
    "resolve_base", "set_cpu_packed_nf4",
]  # fmt: skip
