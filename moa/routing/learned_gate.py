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
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from moa.adapters.file_checks import check_finite, check_inside_folder, read_json_file
from moa.adapters.magnitude import check_gain, compute_dtype
from moa.adapters.peft_format import read_safetensors
from moa.atomic import atomic_directory
from moa.errors import AdapterFormatError, RoutingError, UnknownAdapterError, format_choices
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


def _gate_settings(config: dict[str, Any], source: str) -> dict[str, Any]:
    """The constructor arguments in a ``router_config.json``, each checked (the field named when wrong)."""

    def field(key: str, ok: Any, default: Any, expected: str) -> Any:
        if key not in config and default is not _REQUIRED:
            return default
        value = config.get(key)
        if key not in config or not ok(value):
            raise RoutingError(f"{source}: field {key} = {str(value)[:60]!r} is not valid; expected {expected}. "
                               f"Save the gate again (gate.save(folder)).")
        return value

    def integer(low: int) -> Any:
        return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    field("format_version", integer(1), FORMAT_VERSION, f"an integer <= {FORMAT_VERSION}")
    if config.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise RoutingError(f"{source}: field format_version = {config['format_version']} is newer than this moa "
                           f"reads ({FORMAT_VERSION}). Upgrade moa.")
    names = field("adapter_names", lambda v: isinstance(v, list) and v and all(isinstance(n, str) and n for n in v)
                  and len(set(v)) == len(v), _REQUIRED, "a list of distinct adapter names")
    return {
        "adapter_names": names,
        "hidden_size": field("hidden_size", integer(1), _REQUIRED, "an integer >= 1"),
        "hidden_layer": field("hidden_layer", integer(0), _REQUIRED, "an integer >= 0"),
        "level": field("level", lambda v: v in ("sequence", "token"), "sequence", "'sequence' or 'token'"),
        "mlp_hidden": field("mlp_hidden", integer(0), 0, "an integer >= 0"),
        "temperature": field("temperature", lambda v: number(v) and v > 0, 1.0, "a finite number > 0"),
        "top_k": field("top_k", integer(1), 1, "an integer >= 1"),
        "dropout": field("dropout", lambda v: number(v) and 0 <= v < 1, 0.0, "a number in [0, 1)"),
        "metadata": field("metadata", lambda v: v is None or isinstance(v, dict), None, "an object") or {},
    }


_REQUIRED = object()


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
        folder = Path(directory)
        config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not config_path.exists() or not weights_path.exists():
            raise RoutingError(
                f"{str(folder)!r} is not a learned-gate folder: it needs {CONFIG_NAME} and "
                f"{WEIGHTS_NAME}. Train one with 'moa train-router'."
            )
        config = read_json_file(config_path, RoutingError, folder=folder)
        if config.get("router") != cls.name:
            raise RoutingError(
                f"{str(config_path)!r} describes router {str(config.get('router'))[:40]!r} (field router), "
                f"not {cls.name!r}."
            )
        allowed = {"temperature", "top_k", "level"}
        unknown = set(overrides) - allowed
        if unknown:
            raise RoutingError(f"Cannot override {format_choices(unknown)}; choices: {format_choices(allowed)}.")
        config.update(overrides)
        settings = _gate_settings(config, str(config_path))
        check_inside_folder(folder, weights_path, RoutingError)
        try:
            tensors, _ = read_safetensors(weights_path, float_only=True)
        except AdapterFormatError as error:
            raise RoutingError(str(error)) from error
        check_finite(tensors, repr(str(weights_path)), RoutingError)
        for name, tensor in tensors.items():
            check_gain(name, tensor, repr(str(weights_path)), dtype=compute_dtype(tensor), error_class=RoutingError)
        hidden, mlp, count = settings["hidden_size"], settings["mlp_hidden"], len(settings["adapter_names"])
        expected = {"feature_mean": (hidden,), "feature_std": (hidden,)}
        layers = [(hidden, mlp, "net.0"), (mlp, count, "net.2")] if mlp > 0 else [(hidden, count, "net")]
        for fan_in, fan_out, name in layers:
            expected[f"{name}.weight"], expected[f"{name}.bias"] = (fan_out, fan_in), (fan_out,)
        found = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
        if found != expected:  # checked before the head is built: a hostile size never allocates
            raise RoutingError(
                f"{str(weights_path)!r} does not match {CONFIG_NAME} (fields hidden_size={hidden}, "
                f"mlp_hidden={mlp}, {count} adapter_names): tensors {found}, expected {expected}. "
                f"Save the gate again (gate.save(folder))."
            )
        if float(tensors["feature_std"].min()) <= 0:
            raise RoutingError(f"{str(weights_path)!r}: tensor 'feature_std' must be > 0 everywhere (it divides).")
        gate = cls(**settings)
        gate.head.load_state_dict(tensors)
        return gate.eval()
