"""Folding adapters into the base weights: in place, unloaded, or saved as a dense model.

* :func:`merge_into_base` adds an adapter's (or a weighted mixture's) weight change to the
  base layers in place; the :class:`~moa.MixtureModel` stays usable (the merged adapters
  leave the bank, so they are not applied twice).
* :func:`merge_and_unload` does that and returns the plain ``transformers`` model.
* :func:`save_merged` writes a dense merged model (bf16 by default) that
  ``AutoModelForCausalLM.from_pretrained`` loads, without changing the model.

Dense (fp32/bf16) bases are merged exactly (to the dtype's rounding). An NF4 base is
dequantized, the change added, and the sum re-quantized with the layer's own settings
(quant type, block size, double quantization, storage dtype). That rounds the merged
weight back onto the 4-bit grid, so the merged model is *not* the unmerged one: the
returned :class:`MergeReport` measures by how much, per layer, on sample inputs.

Reading a report: ``requant_error`` (re-quantizing the unchanged weight the same way) is
~0, because NF4 is idempotent on its own grid; ``merge_error`` is about as large as the
error of quantizing a dense weight to NF4 in the first place (the merged weight is off
the grid again). ``adapter_effect`` says how much the adapter changes the layer's output;
when ``merge_error`` is comparable to it, a good part of the adapter is lost, and
:func:`save_merged` (dense) or serving the adapter unmerged is the better choice.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from moa import compat
from moa.atomic import atomic_directory
from moa.merge.report import LayerMergeError, MergeReport
from moa.merge.strategies import MergeError

if TYPE_CHECKING:
    from moa.model.mixture_linear import MixtureLinear
    from moa.model.mixture_model import MixtureModel

logger = logging.getLogger(__name__)

Adapters = str | Sequence[str] | Mapping[str, float] | None


# --- public functions --------------------------------------------------------------------


def resolve_mixture(model: MixtureModel, adapters: Adapters = None, weights: Sequence[float] | None = None) -> dict[str, float]:
    """``{name: weight}`` from a name, a list (+ ``weights``), a dict, or ``None`` (the active adapters).

    Raises:
        MergeError: Nothing to merge, bad weights.
        UnknownAdapterError: A name is not loaded.
    """
    if adapters is None:
        names = list(model.active_adapters)
        if not names:
            raise MergeError("No adapter is active and none was named. Name one, or call model.set_adapter(name).")
        adapters = names
    if isinstance(adapters, str):
        adapters = [adapters]
    if isinstance(adapters, Mapping):
        if weights is not None:
            raise MergeError("Give weights either in the adapters dict or as weights=, not both.")
        mixture = {str(k): float(v) for k, v in adapters.items()}
    else:
        names = list(adapters)
        values = [1.0] * len(names) if weights is None else [float(w) for w in weights]
        if len(values) != len(names):
            raise MergeError(f"{len(names)} adapters {names} but {len(values)} weights {list(weights or [])}.")
        mixture = dict(zip(names, values))
    if not mixture or any(not math.isfinite(w) for w in mixture.values()):
        raise MergeError(f"Need at least one adapter with a finite weight to merge; got {mixture!r}.")
    model.bank.check_known(list(mixture))
    return mixture


def merge_into_base(
    model: MixtureModel,
    adapters: Adapters = None,
    weights: Sequence[float] | None = None,
    *,
    keep_adapters: bool = False,
    sample_input_ids: Tensor | None = None,
    num_samples: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> MergeReport:
    """Add an adapter (or a weighted mixture) to the base weights, in place.

    Args:
        model: The MixtureModel.
        adapters: A name, a list of names (with ``weights``, default 1 each, as
            ``set_adapter`` sums them), a ``{name: weight}`` dict, or ``None`` for the
            active adapters.
        weights: Weights for a list of names.
        keep_adapters: Keep the merged adapters in the bank (they are taken out of the
            active set; applying them again would count them twice). Default: delete them.
        sample_input_ids: Token ids ``[B, S]``: layer inputs are captured from them (else
            Gaussian inputs) and the logits are compared before/after.
        num_samples: Rows of sample inputs per layer.
        seed: Seed for the Gaussian sample inputs.
        progress: Show a progress bar over layers.

    Returns:
        A :class:`MergeReport` (also logged).

    Raises:
        MergeError: Nothing to merge, or an adapter that cannot be folded (not low rank and
            no ``delta_weight``); checked before any weight changes.
    """
    mixture = resolve_mixture(model, adapters, weights)
    layers = [layer for layer in model.mixture_layers() if any(n in layer.adapters for n in mixture)]
    for layer in layers:
        for name in mixture:
            if name in layer.adapters:
                _check_foldable(layer.adapters[name], name, layer.module_name)
    inputs: dict[str, Tensor] = {}
    before = None
    if sample_input_ids is not None:
        before, inputs = _capture(model, sample_input_ids, mixture, layers, num_samples)
    generator = torch.Generator().manual_seed(int(seed))
    results = []
    quantized = False
    for layer in _progress(layers, progress, "merge into base"):
        x = inputs.get(layer.module_name)
        if x is None:
            x = torch.randn(num_samples, layer.in_features, generator=generator)
        delta = layer_delta(layer, mixture)
        quantized |= _is_4bit(layer.base_layer)
        results.append(_fold(layer, delta, x))
    for name in mixture:
        if keep_adapters:
            model.active_adapters = [a for a in model.active_adapters if a != name]
        else:
            model.delete_adapter(name)
    report = MergeReport(mixture=dict(mixture), quantization="nf4" if quantized else None, layers=results)
    if sample_input_ids is not None and before is not None:
        with torch.no_grad(), model.disable_adapters():
            after = model(sample_input_ids.to(model.device)).logits.float()
        report.output_error = _relative(after, before)
    logger.info("Merge into base: %s", report.summary())
    return report


def merge_and_unload(
    model: MixtureModel,
    adapter_names: Adapters = None,
    weights: Sequence[float] | None = None,
    *,
    progress: bool = True,
    sample_input_ids: Tensor | None = None,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, MergeReport]:
    """Fold the active adapters (or the given mixture) into the base; return the plain model.

    Every :class:`~moa.MixtureLinear` is replaced by its base layer and moa's routing hook
    removed, so the result is an ordinary ``transformers`` model (NF4 bases stay NF4; use
    :func:`save_merged` for a dense export). Like PEFT's method of the same name, the
    MixtureModel must not be used afterwards. With no active adapter and none named, the
    base is returned unchanged.

    Returns:
        The transformers model, or ``(model, report)`` with ``return_report=True``.
    """
    report = None
    if adapter_names is not None or model.active_adapters:
        report = merge_into_base(
            model, adapter_names, weights, keep_adapters=True, sample_input_ids=sample_input_ids, progress=progress
        )
    base = unload(model)
    if return_report:
        return base, report or MergeReport(mixture={}, quantization=None)
    return base


def unload(model: MixtureModel) -> nn.Module:
    """Replace every MixtureLinear by its base layer, drop moa's hooks; return the base model."""
    return model.unload()


def save_merged(
    model: MixtureModel,
    directory: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    adapters: Adapters = None,
    weights: Sequence[float] | None = None,
    *,
    progress: bool = True,
) -> Path:
    """Write a dense merged model that ``AutoModelForCausalLM.from_pretrained`` loads.

    NF4 weights are dequantized and the change added in float32 before the cast to
    ``dtype``, so nothing is re-quantized. The model itself is not changed. The tokenizer
    is saved beside it when the model has one. The folder is written atomically.

    Args:
        model: The MixtureModel.
        directory: Output folder (replaced if it exists).
        dtype: Dtype of every saved tensor.
        adapters: What to merge (as :func:`merge_into_base`); ``None`` with no active
            adapter saves the base alone.
        weights: Weights for a list of names.
        progress: Show a progress bar over layers.

    Returns:
        The folder.
    """
    mixture = resolve_mixture(model, adapters, weights) if adapters is not None or model.active_adapters else {}
    wrapped = {layer.module_name: layer for layer in model.mixture_layers()}
    for layer in wrapped.values():
        for name in mixture:
            if name in layer.adapters:
                _check_foldable(layer.adapters[name], name, layer.module_name)
    config = copy.deepcopy(model.base_model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    fresh = type(model.base_model)(config)
    expected = fresh.state_dict()
    state: dict[str, Tensor] = {}
    skip = tuple(f"{name}.adapters" for name in wrapped)
    for name, module in model.base_model.named_modules():
        if name.startswith(skip):
            continue
        clean = name.replace(".base_layer", "")
        for key, tensor in _own_tensors(module):
            full = f"{clean}.{key}" if clean else key
            if full in expected:
                state[full] = tensor
    for name, layer in _progress(list(wrapped.items()), progress and bool(mixture), "dense export"):
        delta = layer_delta(layer, mixture) if mixture else None
        if delta is not None:
            weight = state[f"{name}.weight"]
            state[f"{name}.weight"] = weight.float() + delta.to(weight.device)
    missing = [k for k in expected if k not in state]
    tied = compat.tied_weights_keys(fresh)
    missing = [k for k in missing if k not in tied and not (config.tie_word_embeddings and k.startswith("lm_head"))]
    if missing:
        raise MergeError(f"Cannot export the merged model: no value for {missing[:5]} (base class {type(fresh).__name__}).")
    fresh.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    fresh.to(dtype)
    fresh.eval()
    if getattr(model.base_model, "generation_config", None) is not None:
        fresh.generation_config = copy.deepcopy(model.base_model.generation_config)
    with atomic_directory(directory) as tmp:
        fresh.save_pretrained(tmp)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
    logger.info("Saved the base merged with %s as a dense %s model to %s.", mixture or "no adapter", dtype, directory)
    return Path(directory)


# --- per-layer work ----------------------------------------------------------------------


def layer_delta(layer: MixtureLinear, mixture: Mapping[str, float]) -> Tensor | None:
    """``sum_j w_j * delta_j`` on this layer (float32 ``[out, in]``), or ``None`` if none applies."""
    total = None
    for name, weight in mixture.items():
        if name not in layer.adapters:
            continue
        adapter = layer.adapters[name]
        low_rank = adapter.low_rank()
        if low_rank is not None:
            a, b, scale = low_rank
            delta = float(scale) * (b.detach().float() @ a.detach().float())
        else:
            delta = adapter.delta_weight().detach().float()
        total = weight * delta if total is None else total + weight * delta
    return total


def _check_foldable(adapter: nn.Module, name: str, module_name: str) -> None:
    if adapter.low_rank() is None and not callable(getattr(adapter, "delta_weight", None)):
        raise MergeError(
            f"Adapter {name!r} ({type(adapter).__name__}) on {module_name!r} is neither low rank nor has "
            f"delta_weight(), so it cannot be folded into the base weight. Serve it unmerged."
        )


def _is_4bit(module: nn.Module) -> bool:
    from moa.model.base_loading import is_quantized_linear

    return is_quantized_linear(module)


def _dequantized(layer: nn.Module) -> Tensor:
    """The float32 weight a 4-bit layer computes with (CPU-packed weights are unpacked first)."""
    from moa.model.base_loading import import_bitsandbytes, set_cpu_packed_nf4

    bnb = import_bitsandbytes()
    set_cpu_packed_nf4(layer, False)
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def _quantize_like(layer: nn.Module, weight: Tensor) -> tuple[Tensor, Any]:
    """Quantize ``weight`` with ``layer``'s settings: ``(packed data, quant_state)``."""
    from moa.model.base_loading import import_bitsandbytes

    bnb = import_bitsandbytes()
    state = layer.weight.quant_state
    return bnb.functional.quantize_4bit(
        weight.to(state.dtype).contiguous(),
        blocksize=state.blocksize,
        compress_statistics=bool(state.nested),
        quant_type=state.quant_type,
        quant_storage=layer.weight.data.dtype,
    )


def _fold(layer: MixtureLinear, delta: Tensor | None, x: Tensor) -> LayerMergeError:
    base = layer.base_layer
    with torch.no_grad():
        if _is_4bit(base):
            from moa.model.base_loading import import_bitsandbytes

            dequantize = import_bitsandbytes().functional.dequantize_4bit
            weight = _dequantized(base)
            x = x.to(device=weight.device, dtype=torch.float32)
            ideal = weight + (delta.to(weight.device) if delta is not None else 0.0)
            data, state = _quantize_like(base, ideal)
            plain, plain_state = _quantize_like(base, weight)
            requant = _relative(x @ dequantize(plain, plain_state).float().T, x @ weight.T)
            base.weight.data, base.weight.quant_state = data, state
            base.quant_state = state
            merged = dequantize(data, state).float()
        else:
            weight = base.weight.data.float().clone()
            x = x.to(device=weight.device, dtype=torch.float32)
            ideal = weight + (delta.to(weight.device) if delta is not None else 0.0)
            base.weight.data.copy_(ideal.to(base.weight.dtype))
            merged, requant = base.weight.data.float(), 0.0
        target = x @ ideal.T
        effect = _relative(x @ ideal.T, x @ weight.T, denominator=target)
        return LayerMergeError(layer.module_name, _relative(x @ merged.T, target), requant, effect)


def _relative(value: Tensor, reference: Tensor, denominator: Tensor | None = None) -> float:
    scale = (reference if denominator is None else denominator).float().norm()
    return float((value.float() - reference.float()).norm() / scale.clamp(min=1e-30))


def _capture(
    model: MixtureModel, input_ids: Tensor, mixture: Mapping[str, float], layers: Sequence[MixtureLinear], rows: int
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """Unmerged logits (``None`` for negative weights) and up to ``rows`` input rows per layer."""
    captured: dict[str, Tensor] = {}

    def hook(module: MixtureLinear, args: tuple) -> None:
        flat = args[0].detach().reshape(-1, module.in_features)
        captured[module.module_name] = flat[:rows].float().cpu()

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        with torch.no_grad():
            ids = input_ids.to(model.device)
            if any(weight < 0 for weight in mixture.values()):  # a forward mixes non-negative weights only
                logger.info("Negative merge weights: layer inputs from the base; no logits comparison.")
                with model.disable_adapters():
                    model(ids)
                return None, captured
            logits = model(ids, adapter_weights=[dict(mixture)] * int(ids.shape[0])).logits.float()
    finally:
        for handle in handles:
            handle.remove()
    return logits, captured


def _own_tensors(module: nn.Module) -> Iterable[tuple[str, Tensor]]:
    """A module's own parameters and buffers, 4-bit weights dequantized to float32."""
    quantized = _is_4bit(module)
    for key, param in module.named_parameters(recurse=False):
        yield key, (_dequantized(module) if quantized and key == "weight" else param.detach())
    for key, buffer in module.named_buffers(recurse=False):
        yield key, buffer.detach()


def _progress(items: Sequence[Any], enabled: bool, description: str) -> Sequence[Any]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="layer")
