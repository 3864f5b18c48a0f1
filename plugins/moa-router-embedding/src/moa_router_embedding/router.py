"""EmbeddingRouter: nearest adapter centroids of the prompt's mean hidden state.

The router declares ``hidden_layer = L``: moa hands it the input of decoder layer ``L``,
computed with no adapter *inside the same forward* (layers ``< L`` run the base alone,
the adapters it picks apply from layer ``L`` on; see ``moa.routing.Router``). It
averages those hidden states over the prompt's real tokens (``attention_mask``), takes
the cosine similarity to one centroid per adapter, keeps the ``top_k`` most similar and
weights them by ``softmax(similarity / temperature)``.

Centroids come from :meth:`EmbeddingRouter.fit`: the mean of the (unit-normalised) mean
hidden states of a few example prompts per adapter. A router folder holds
``router_config.json`` and ``router.safetensors`` (the centroids, ``[n_adapters, H]``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moa.adapters.file_checks import check_finite, check_inside_folder, read_json_file
from moa.adapters.peft_format import read_safetensors
from moa.errors import AdapterFormatError, RoutingError
from moa.routing import Router, RoutingDecision, RoutingRequest

logger = logging.getLogger(__name__)

CONFIG_NAME = "router_config.json"
WEIGHTS_NAME = "router.safetensors"
FORMAT_VERSION = 1


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens of each row: ``[B, S, H]`` -> ``[B, H]`` (float32).

    Args:
        hidden: Hidden states.
        attention_mask: ``[B, S]`` with 1 for real tokens (either padding side), or ``None``.
    """
    hidden = hidden.float()
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.device, torch.float32)[..., None]
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EmbeddingRouter(Router):
    """Route each request to the adapters whose centroids its mean hidden state is closest to.

    Args:
        centroids: ``{adapter: [H] tensor}``; usually left empty and set by :meth:`fit`.
        hidden_layer: Decoder layer whose *input* is embedded (0 = token embeddings).
        top_k: Adapters per request.
        temperature: Softmax temperature over the top-k cosine similarities (> 0); small
            values approach a hard choice.
        min_similarity: If set, a request whose best similarity is below it runs the base.

    Raises:
        RoutingError: Invalid arguments.

    Example::

        router = EmbeddingRouter(hidden_layer=2, top_k=2, temperature=0.05)
        router.fit(model, {"sql": ["SELECT ...", ...], "code": ["def f(): ...", ...]})
        model.set_router(router)
        model.route(["count rows of t"])   # [{"sql": 0.97, "code": 0.03}]
    """

    name = "embedding"
    level = "sequence"

    def __init__(
        self,
        centroids: Mapping[str, torch.Tensor] | None = None,
        *,
        hidden_layer: int = 2,
        top_k: int = 1,
        temperature: float = 0.1,
        min_similarity: float | None = None,
    ) -> None:
        if not isinstance(hidden_layer, int) or isinstance(hidden_layer, bool) or hidden_layer < 0:
            raise RoutingError(f"EmbeddingRouter hidden_layer must be an int >= 0; got {hidden_layer!r}.")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise RoutingError(f"EmbeddingRouter top_k must be an int >= 1; got {top_k!r}.")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise RoutingError(f"EmbeddingRouter temperature must be a finite number > 0; got {temperature!r}.")
        self.hidden_layer = hidden_layer
        self.top_k = top_k
        self.temperature = float(temperature)
        self.min_similarity = None if min_similarity is None else float(min_similarity)
        self.centroids: dict[str, torch.Tensor] = {}
        for adapter, centroid in (centroids or {}).items():
            self.set_centroid(adapter, centroid)
        self._warned = False

    def set_centroid(self, adapter: str, centroid: torch.Tensor) -> None:
        """Set one adapter's centroid (``[H]``; stored as float32 on the CPU).

        Raises:
            RoutingError: Not a 1-D finite tensor of the same width as the others.
        """
        vector = torch.as_tensor(centroid).detach().float().cpu()
        widths = {c.shape[0] for name, c in self.centroids.items() if name != adapter}
        if vector.dim() != 1 or not bool(torch.isfinite(vector).all()) or (widths and vector.shape[0] not in widths):
            raise RoutingError(f"Centroid of {adapter!r} must be a finite 1-D tensor of width "
                               f"{widths or 'H'}; got shape {tuple(vector.shape)}.")
        self.centroids[adapter] = vector

    # -- fitting ---------------------------------------------------------------------------

    def embed(self, model: Any, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Mean hidden states (``[N, H]`` float32, CPU) of ``texts`` at :attr:`hidden_layer`.

        Runs the base (no adapter) only up to that layer, as routing does.

        Args:
            model: A :class:`moa.MixtureModel` with a tokenizer.
            texts: Prompts.
            batch_size: Prompts per partial forward.
        """
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise RoutingError("EmbeddingRouter.fit/embed needs a model with a tokenizer.")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        rows = []
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True)
            ids = encoded["input_ids"].to(model.device)
            mask = encoded["attention_mask"].to(model.device)
            hidden = model.hidden_states_at(self.hidden_layer, ids, mask)
            rows.append(masked_mean(hidden, mask).cpu())
        return torch.cat(rows) if rows else torch.empty(0, 0)

    def fit(self, model: Any, examples: Mapping[str, Sequence[str]], batch_size: int = 16) -> EmbeddingRouter:
        """Set each adapter's centroid from example prompts (replacing earlier ones).

        The centroid is the mean of the unit-normalised mean hidden states of its prompts.

        Args:
            model: A :class:`moa.MixtureModel` with a tokenizer (adapters need not be loaded).
            examples: Adapter name -> its example prompts (at least one each).
            batch_size: Prompts per partial forward.

        Returns:
            ``self``, for chaining.

        Raises:
            RoutingError: An adapter without examples.
        """
        for adapter, prompts in examples.items():
            if not prompts:
                raise RoutingError(f"EmbeddingRouter.fit: adapter {adapter!r} has no example prompts.")
        return self.fit_features({adapter: self.embed(model, list(prompts), batch_size)
                                  for adapter, prompts in examples.items()})

    def fit_features(self, features: Mapping[str, torch.Tensor]) -> EmbeddingRouter:
        """Set centroids from precomputed mean hidden states, ``{adapter: [N, H]}``.

        Use it when the prompts must be embedded exactly as your serving path sees them
        (chat template, padding side): compute the pooled inputs of decoder layer
        :attr:`hidden_layer` yourself and pass them here.

        Returns:
            ``self``, for chaining.

        Raises:
            RoutingError: An adapter with no rows, or rows that are not ``[N, H]``.
        """
        for adapter, rows in features.items():
            rows = torch.as_tensor(rows).detach().float().cpu()
            if rows.dim() != 2 or rows.shape[0] == 0:
                raise RoutingError(f"EmbeddingRouter: features of {adapter!r} must be a non-empty "
                                   f"[N, H] tensor; got shape {tuple(rows.shape)}.")
            self.set_centroid(adapter, F.normalize(rows, dim=-1).mean(dim=0))
            logger.info("EmbeddingRouter: centroid of %r from %d examples.", adapter, rows.shape[0])
        return self

    # -- routing ---------------------------------------------------------------------------

    def similarities(self, request: RoutingRequest) -> tuple[list[str], torch.Tensor]:
        """Cosine similarity of each row to each loaded adapter's centroid.

        Returns:
            ``(adapter names, [B, n] float32)``; adapters without a centroid are left out.

        Raises:
            RoutingError: The request carries no hidden states.
        """
        if request.hidden_states is None:
            raise RoutingError(
                "EmbeddingRouter decides from hidden states: set it with model.set_router(router) "
                "and call the model or model.route([...]); moa then passes the input of decoder "
                f"layer {self.hidden_layer}.")
        names = [n for n in request.adapter_names if n in self.centroids]
        embedding = masked_mean(request.hidden_states, request.attention_mask)
        if not names:
            return names, torch.empty(embedding.shape[0], 0)
        centroids = torch.stack([self.centroids[n] for n in names]).to(embedding.device)
        if centroids.shape[1] != embedding.shape[1]:
            raise RoutingError(f"EmbeddingRouter centroids have width {centroids.shape[1]} but the "
                               f"model's hidden states have {embedding.shape[1]}: fit it on this base.")
        sims = F.normalize(embedding, dim=-1) @ F.normalize(centroids, dim=-1).T
        return names, sims.cpu()

    def route(self, request: RoutingRequest) -> RoutingDecision:
        """Top-k adapters per row, softmax(similarity / temperature) weights."""
        names, sims = self.similarities(request)
        batch = sims.shape[0]
        if not names:
            if not self._warned:
                self._warned = True
                logger.warning("EmbeddingRouter: no loaded adapter has a centroid (centroids: %s; "
                               "loaded: %s); rows run the base.", sorted(self.centroids),
                               list(request.adapter_names))
            return RoutingDecision.from_mixtures([None] * batch, request.adapter_names)
        k = min(self.top_k, len(names))
        top, index = sims.topk(k, dim=1)
        weights = torch.softmax(top / self.temperature, dim=1)
        slots = torch.tensor([list(request.adapter_names).index(n) for n in names], dtype=torch.int32)
        ids = slots[index]
        if self.min_similarity is not None:
            far = top[:, 0] < self.min_similarity
            ids[far] = -1
            weights[far] = 0.0
        return RoutingDecision(ids=ids.to(torch.int32), weights=weights.float(), level="row")

    # -- persistence -----------------------------------------------------------------------

    def to_config(self) -> dict[str, Any]:
        """The router's settings as stored in ``router_config.json``."""
        return {
            "router": self.name,
            "format_version": FORMAT_VERSION,
            "hidden_layer": self.hidden_layer,
            "top_k": self.top_k,
            "temperature": self.temperature,
            "min_similarity": self.min_similarity,
            "adapter_names": list(self.centroids),
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``router_config.json`` and ``router.safetensors`` (centroids) to ``directory``.

        Returns:
            The folder.
        """
        from safetensors.torch import save

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        names = list(self.centroids)
        tensors = {"centroids": torch.stack([self.centroids[n] for n in names]).contiguous()
                   if names else torch.empty(0, 0)}
        metadata = {"format": "pt", "moa.router": self.name, "adapter_names": json.dumps(names)}
        _atomic_write(path / WEIGHTS_NAME, save(tensors, metadata))
        config = json.dumps(self.to_config(), indent=2, sort_keys=True) + "\n"
        _atomic_write(path / CONFIG_NAME, config.encode("utf-8"))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> EmbeddingRouter:
        """Read a folder written by :meth:`save`.

        Raises:
            RoutingError: Missing, malformed or mismatched files.
        """
        path = Path(directory)
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        for needed in (config_path, weights_path):
            if not needed.exists():
                raise RoutingError(f"{str(path)!r} is not an EmbeddingRouter folder: {needed.name} is "
                                   f"missing (expected {CONFIG_NAME} and {WEIGHTS_NAME}).")
        config = read_json_file(config_path, RoutingError, folder=path)
        if config.get("router") != cls.name:
            raise RoutingError(f"{str(config_path)!r} holds a {str(config.get('router'))[:40]!r} router "
                               f"(field router), not {cls.name!r}.")
        version = config.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
            raise RoutingError(f"{str(config_path)!r} has format_version {str(version)[:40]}; this "
                               f"moa-router-embedding reads integers up to {FORMAT_VERSION}. Upgrade it.")
        names = config.get("adapter_names", [])
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise RoutingError(f"{str(config_path)!r}: field adapter_names = {str(names)[:60]!r} must be a list of "
                               f"distinct adapter names.")
        check_inside_folder(path, weights_path, RoutingError)
        try:
            tensors, _ = read_safetensors(weights_path, float_only=True)
        except AdapterFormatError as error:
            raise RoutingError(f"Could not read the EmbeddingRouter in {str(path)!r}: {error}") from error
        check_finite(tensors, repr(str(weights_path)), RoutingError)
        centroids = tensors.get("centroids")
        if centroids is None or centroids.dim() != 2 or tuple(centroids.shape[:1]) != (len(names),):
            raise RoutingError(f"{str(weights_path)!r} must hold 'centroids' of shape "
                               f"[{len(names)}, H] for adapters {names}.")
        missing = [key for key in ("hidden_layer", "top_k", "temperature") if key not in config]
        if missing:
            raise RoutingError(f"{str(config_path)!r} lacks field(s) {', '.join(missing)}. Save the router again.")
        min_similarity = config.get("min_similarity")
        if min_similarity is not None and not (isinstance(min_similarity, (int, float)) and not
                                               isinstance(min_similarity, bool) and math.isfinite(min_similarity)):
            raise RoutingError(f"{str(config_path)!r}: field min_similarity = {str(min_similarity)[:40]!r} must "
                               f"be a finite number or null.")
        try:
            return cls({n: centroids[i] for i, n in enumerate(names)}, hidden_layer=config["hidden_layer"],
                       top_k=config["top_k"], temperature=config["temperature"], min_similarity=min_similarity)
        except RoutingError as error:
            raise RoutingError(f"{str(config_path)!r}: {error}") from error

    def __repr__(self) -> str:
        return (f"EmbeddingRouter(adapters={list(self.centroids)}, hidden_layer={self.hidden_layer}, "
                f"top_k={self.top_k}, temperature={self.temperature:g})")
