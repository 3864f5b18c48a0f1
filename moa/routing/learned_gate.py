"""The learned gate: a small head on the base's own hidden states picks the adapters.

The gate declares ``hidden_layer = L``. Inside the same forward, layers ``< L`` run the
base alone, the gate reads the input of decoder layer ``L`` (no adapter applied yet),
decides, and the chosen adapters apply from layer ``L`` on. There is no second pass
over the prompt (X-LoRA runs the whole model twice).

* ``level="sequence"`` (default): the hidden states are mean-pooled over the prompt's
  attention mask, one decision per request, reused for every generated token (the KV
  cache stays valid).
* ``level="token"``: every token is routed on its own hidden state, at every step.

The head standardises its input (mean/std of the training features, stored with it),
then a linear layer or a one-hidden-layer MLP gives logits over the gate's adapters;
``softmax(logits / temperature)`` keeps the ``top_k`` largest weights, renormalised to
sum to 1. Trained on domain labels (cross-entropy on cached features, seconds) or end
to end through the mixture's LM loss (see :mod:`moa.train.router`).

Saved as ``router_config.json`` + ``router.safetensors``.

Example::

    gate = LearnedGate(["sql", "code"], hidden_size=576, hidden_layer=2)
    ...  # moa.train.router.fit_gate_on_labels(gate, features, labels)
    model.set_router(gate)
    model.generate(**inputs)  # each row decided from its own prompt, in-pass
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from moa.atomic import atomic_directory
from moa.errors import RoutingError, UnknownAdapterError, format_choices
from moa.routing.decision import RoutingDecision
from moa.routing.router import Router, RoutingRequest

CONFIG_NAME = "router_config.json"
WEIGHTS_NAME = "router.safetensors"
FORMAT_VERSION = 1


def pool_hidden_states(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` ``[B, S, H]`` over the positions where ``attention_mask`` is 1.

    Args:
        hidden: Hidden states of a batch.
        attention_mask: ``[B, S]`` (1 = real token) or ``None`` (every position counts).

    Returns:
        ``[B, H]`` float32.
    """
    hidden = hidden.float()
    if attention_mask is None or attention_mask.shape[:2] != hidden.shape[:2]:
        return hidden.mean(dim=1)
    mask = attention_mask.to(device=hidden.device, dtype=hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def top_k_weights(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest probabilities per row, renormalised to sum to 1.

    Args:
        probs: ``[N, A]`` probabilities.
        k: How many to keep (clipped to ``A``).

    Returns:
        ``(indices [N, k] int64, weights [N, k])``; the weights stay differentiable.
    """
    k = max(1, min(int(k), probs.shape[-1]))
    values, indices = probs.topk(k, dim=-1)
    return indices, values / values.sum(dim=-1, keepdim=True).clamp(min=1e-12)


class GateHead(nn.Module):
    """Standardise, then linear (``mlp_hidden=0``) or Linear-GELU-Linear, to logits.

    Args:
        hidden_size: Width of the base's hidden states.
        num_adapters: Number of outputs.
        mlp_hidden: Width of the hidden layer; 0 for a linear head.
        dropout: Dropout on the standardised input while training.
    """

    def __init__(self, hidden_size: int, num_adapters: int, mlp_hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(hidden_size))
        self.register_buffer("feature_std", torch.ones(hidden_size))
        self.dropout = nn.Dropout(dropout)
        if mlp_hidden > 0:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(hidden_size, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, num_adapters)
            )
        else:
            self.net = nn.Linear(hidden_size, num_adapters)

    def set_normalization(self, features: torch.Tensor) -> None:
        """Store the per-dimension mean and std of ``features`` ``[N, H]``."""
        with torch.no_grad():
            self.feature_mean.copy_(features.float().mean(0))
            self.feature_std.copy_(features.float().std(0, unbiased=False).clamp(min=1e-4))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, A]`` for features ``[N, H]``."""
        z = (features.float() - self.feature_mean) / self.feature_std
        return self.net(self.dropout(z))


class LearnedGate(Router, nn.Module):
    """A trained router that decides from the base's hidden states at one layer.

    Args:
        adapter_names: The adapters the gate chooses among (its output classes). They
            must be loaded in the model it routes; the model may hold others too.
        hidden_size: Width of the base's hidden states.
        hidden_layer: The decoder layer whose input the gate reads (0 = embeddings).
        level: ``"sequence"`` (pooled prompt, one decision per request) or ``"token"``.
        mlp_hidden: Width of the head's hidden layer (0 = linear head).
        temperature: Softmax temperature (< 1 sharper, > 1 flatter).
        top_k: Adapters kept per request/token, weights renormalised.
        dropout: Input dropout while training.
        metadata: Free-form JSON-serialisable facts saved with the gate (training
            metrics, base fingerprint...).
    """

    name = "learned_gate"

    def __init__(
        self,
        adapter_names: Sequence[str],
        hidden_size: int,
        hidden_layer: int = 2,
        level: Literal["sequence", "token"] = "sequence",
        mlp_hidden: int = 64,
        temperature: float = 1.0,
        top_k: int = 1,
        dropout: float = 0.1,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        nn.Module.__init__(self)
        names = list(adapter_names)
        if not names or len(set(names)) != len(names):
            raise RoutingError(f"LearnedGate needs distinct adapter names; got {names!r}.")
        if level not in ("sequence", "token"):
            raise RoutingError(f"LearnedGate level={level!r} is not valid. Choices: sequence, token.")
        if not float(temperature) > 0:
            raise RoutingError(f"LearnedGate temperature must be > 0; got {temperature!r}.")
        if int(top_k) < 1:
            raise RoutingError(f"LearnedGate top_k must be >= 1; got {top_k!r}.")
        if int(hidden_layer) < 0:
            raise RoutingError(f"LearnedGate hidden_layer must be >= 0; got {hidden_layer!r}.")
        self.gate_adapters = names
        self.hidden_size = int(hidden_size)
        self.hidden_layer = int(hidden_layer)
        self.level = level
        self.mlp_hidden = int(mlp_hidden)
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.dropout_p = float(dropout)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.head = GateHead(self.hidden_size, len(names), self.mlp_hidden, self.dropout_p)
        self.eval()

    # -- the math ------------------------------------------------------------------------

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Head logits ``[N, A]`` for pooled (or per-token) features ``[N, H]``."""
        if features.shape[-1] != self.hidden_size:
            raise RoutingError(
                f"LearnedGate expects features of width {self.hidden_size}, got "
                f"{tuple(features.shape)}. Was it trained on another base?"
            )
        return self.head(features)

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """``softmax(logits / temperature)`` over the gate's adapters, ``[N, A]``."""
        return torch.softmax(self.logits(features) / self.temperature, dim=-1)

    def mixture_weights(self, features: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
        """Dense ``[N, A]`` weights after top-k and renormalisation (differentiable)."""
        probs = self.probabilities(features)
        indices, weights = top_k_weights(probs, self.top_k if top_k is None else top_k)
        return torch.zeros_like(probs).scatter(-1, indices, weights)

    def decision_from_features(
        self,
        features: torch.Tensor,
        adapter_names: Sequence[str],
        level: Literal["row", "token"] = "row",
        top_k: int | None = None,
    ) -> RoutingDecision:
        """A :class:`RoutingDecision` for features ``[N, H]`` against the model's slots.

        The weights stay attached to the autograd graph, so a loss on the model's output
        reaches the gate through ``RoutingDecision.weights``.
        """
        slots = self._slots(adapter_names).to(features.device)
        probs = self.probabilities(features)
        indices, weights = top_k_weights(probs, self.top_k if top_k is None else top_k)
        ids = slots[indices].to(torch.int32)
        return RoutingDecision(ids=ids, weights=weights.float(), level=level)

    # -- Router API ------------------------------------------------------------------------

    def route(self, request: RoutingRequest) -> RoutingDecision:
        """Decide from ``request.hidden_states`` (the input of layer ``hidden_layer``)."""
        hidden = request.hidden_states
        if hidden is None:
            raise RoutingError(
                "LearnedGate decides from hidden states, but the request carries none. Use it "
                "through model.set_router(gate) (the model hands it the layer's input)."
            )
        if self.level == "token":
            features = hidden.reshape(-1, hidden.shape[-1])
            return self.decision_from_features(features, request.adapter_names, level="token")
        pooled = pool_hidden_states(hidden, request.attention_mask)
        return self.decision_from_features(pooled, request.adapter_names, level="row")

    def _slots(self, adapter_names: Sequence[str]) -> torch.Tensor:
        index = {name: i for i, name in enumerate(adapter_names)}
        missing = [n for n in self.gate_adapters if n not in index]
        if missing:
            raise UnknownAdapterError(
                f"The learned gate routes to {format_choices(missing)}, which the model has not "
                f"loaded. Loaded: {format_choices(adapter_names)}. Load those adapters (same "
                f"names) before routing with this gate."
            )
        return torch.tensor([index[n] for n in self.gate_adapters], dtype=torch.long)

    def __repr__(self) -> str:
        return (
            f"LearnedGate(adapters={self.gate_adapters}, hidden_layer={self.hidden_layer}, "
            f"level={self.level!r}, top_k={self.top_k}, temperature={self.temperature:g})"
        )

    # -- persistence -----------------------------------------------------------------------

    def config_dict(self) -> dict[str, Any]:
        """The JSON written to ``router_config.json``."""
        return {
            "router": self.name,
            "format_version": FORMAT_VERSION,
            "adapter_names": self.gate_adapters,
            "hidden_size": self.hidden_size,
            "hidden_layer": self.hidden_layer,
            "level": self.level,
            "mlp_hidden": self.mlp_hidden,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "dropout": self.dropout_p,
            "metadata": self.metadata,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``router_config.json`` + ``router.safetensors`` atomically into ``directory``."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous().float() for k, v in self.head.state_dict().items()}
        with atomic_directory(directory) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2, sort_keys=True) + "\n")
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"moa.router": self.name})
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike, **overrides: Any) -> LearnedGate:
        """Load a gate saved by :meth:`save`.

        Args:
            directory: The folder.
            **overrides: Inference options to change (``temperature``, ``top_k``, ``level``).

        Raises:
            RoutingError: missing, corrupt or mismatched files.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(directory)
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise RoutingError(
                f"{str(folder)!r} is not a learned-gate folder: it needs {CONFIG_NAME} and "
                f"{WEIGHTS_NAME}. Train one with 'moa train-router'."
            )
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as error:
            raise RoutingError(f"Cannot read {str(config_path)!r}: {error}.") from error
        if config.get("router") != cls.name:
            raise RoutingError(
                f"{str(config_path)!r} describes router {config.get('router')!r}, not {cls.name!r}."
            )
        allowed = {"temperature", "top_k", "level"}
        unknown = set(overrides) - allowed
        if unknown:
            raise RoutingError(f"Cannot override {format_choices(unknown)}; choices: {format_choices(allowed)}.")
        config.update(overrides)
        gate = cls(
            adapter_names=config["adapter_names"],
            hidden_size=config["hidden_size"],
            hidden_layer=config["hidden_layer"],
            level=config.get("level", "sequence"),
            mlp_hidden=config.get("mlp_hidden", 0),
            temperature=config.get("temperature", 1.0),
            top_k=config.get("top_k", 1),
            dropout=config.get("dropout", 0.0),
            metadata=config.get("metadata") or {},
        )
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as error:
            raise RoutingError(f"{str(weights_path)!r} is not a readable safetensors file: {error}.") from error
        expected = gate.head.state_dict()
        if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
            raise RoutingError(
                f"{str(weights_path)!r} does not match {CONFIG_NAME} (tensors "
                f"{format_choices(tensors)}, expected {format_choices(expected)} with matching shapes)."
            )
        gate.head.load_state_dict(tensors)
        return gate.eval()
