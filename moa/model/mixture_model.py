"""MixtureModel: one base model, many adapters, mixed per request with PEFT's API."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from moa.adapters.base import AdapterConfig, AdapterLayer
from moa.errors import (
    AdapterExistsError,
    AdapterShapeError,
    RoutingError,
    UnknownAdapterError,
    format_choices,
)
from moa.model import adapter_io
from moa.model.mixture_linear import MixtureLinear, RoutingState
from moa.model.routing_controller import Pinned, RoutingController
from moa.model.targets import linear_features, resolve_target_modules
from moa.routing.decision import Mixture, RoutingDecision
from moa.routing.router import Router

logger = logging.getLogger(__name__)

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")
#: PEFT's name for "no adapter" in ``adapter_names``.
BASE_ROW = "__base__"


class MixtureModel(nn.Module):
    """A causal LM whose linear layers carry a bank of adapters, mixed per row or token.

    Build with :meth:`from_pretrained`, then use PEFT's verbs (``add_adapter``,
    ``load_adapter``, ``set_adapter``, ``adapter_names=`` per row) or moa's
    (``adapter_weights=`` per row, ``set_router``).

    Args:
        base_model: A transformers causal LM (dense or bitsandbytes NF4).
        tokenizer: Its tokenizer (needed by :meth:`route` on text).
        max_rank: Largest adapter rank accepted (bigger ones raise AdapterShapeError).
    """

    def __init__(self, base_model: nn.Module, tokenizer: Any = None, max_rank: int = 256):
        super().__init__()
        from moa.model.base_loading import base_fingerprint  # heavy deps, imported late

        base_model.requires_grad_(False)  # only adapters train, as in PEFT
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.max_rank = int(max_rank)
        self.base_fingerprint = base_fingerprint(base_model)
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapters: list[str] = []
        self._state = RoutingState()
        self._router: Router | None = None
        self._routing = RoutingController(self)

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike = "default",
        quantization: str | None = "nf4",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_rank: int = 256,
    ) -> MixtureModel:
        """Load a base model (``"default"``, a local folder or a cached Hub id).

        Args:
            base: ``"default"`` (SmolLM2-135M-Instruct, shipped offline), a folder, or a Hub id.
            quantization: ``"nf4"`` (bitsandbytes, double quant) or ``None`` (dense).
            device: Where to put it (default: CUDA if available, else CPU).
            dtype: Dense dtype / NF4 compute dtype (default: float32 on CPU, bfloat16 on CUDA).
            max_rank: Largest adapter rank accepted.
        """
        from moa.model.base_loading import load_base

        model, tokenizer = load_base(base, quantization=quantization, device=device, dtype=dtype)
        return cls(model, tokenizer, max_rank=max_rank)

    # -- properties ------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        """Loaded adapters, in slot order."""
        return list(self._state.adapter_names)

    @property
    def config(self) -> Any:
        """The base model's transformers config."""
        return self.base_model.config

    @property
    def device(self) -> torch.device:
        """Device of the base model's first parameter."""
        return next(self.base_model.parameters()).device

    @property
    def router(self) -> Router | None:
        """The router set with :meth:`set_router`, if any."""
        return self._router

    def mixture_layers(self) -> Iterator[MixtureLinear]:
        """Every wrapped layer."""
        for module in self.base_model.modules():
            if isinstance(module, MixtureLinear):
                yield module

    # -- adapters --------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        """Create a new adapter (initialised by its config) on the modules it targets."""
        self._check_new_name(adapter_name)
        config.validate()
        spec = self._adapter_type(config.adapter_type)
        modules = resolve_target_modules(self.base_model, config.target_modules)
        layers = {m: spec.layer_class(config, m, *linear_features(self._base_layer(m))) for m in modules}
        self._install(adapter_name, config, layers, trainable=True)

    def load_adapter(
        self,
        path_or_repo_id: str | os.PathLike,
        adapter_name: str = "default",
        revision: str | None = None,
        is_trainable: bool = False,
    ) -> None:
        """Load a PEFT-format adapter folder (or Hub repo) under ``adapter_name``.

        Everything is checked before the model changes: the base fingerprint, the
        adapter type, every tensor's module and shape, the rank cap. On any error no
        adapter is added and the loaded ones are untouched.
        """
        self._check_new_name(adapter_name)
        config, layers = adapter_io.read_adapter(self, path_or_repo_id, revision=revision)
        self._install(adapter_name, config, layers, trainable=is_trainable)

    def save_adapter(self, adapter_name: str, directory: str | os.PathLike) -> None:
        """Write ``adapter_name`` as a PEFT folder (atomically); PEFT loads it as it is."""
        self._check_known([adapter_name])
        adapter_io.write_adapter(self, adapter_name, directory)

    def push_adapter(self, adapter_name: str, repo_id: str, **kwargs: Any) -> Any:
        """Push one adapter to the Hub: PEFT layout + model card, in one commit.

        See :func:`moa.hub.push_adapter` for the options (``revision``, ``private``,
        ``commit_message``, model-card fields); returns its ``PushResult``.
        """
        from moa.hub import push_adapter

        self._check_known([adapter_name])
        return push_adapter(self, adapter_name, repo_id, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its weights from every layer."""
        self._check_known([adapter_name])
        for layer in self.mixture_layers():
            layer.remove_adapter_layer(adapter_name)
        del self.peft_config[adapter_name]
        self._state.adapter_names.remove(adapter_name)
        self._state.layout_version += 1
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make ``adapter_name`` (or several, summed with weight 1 each) the default for every row."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_known(names)
        self.active_adapters = names

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Within the block, every forward runs the base alone."""
        previous = self._state.enabled
        self._state.enabled = False
        try:
            yield
        finally:
            self._state.enabled = previous

    def adapter_layers(self, adapter_name: str) -> dict[str, AdapterLayer]:
        """Module name -> this adapter's layer on that module."""
        self._check_known([adapter_name])
        return {
            layer.module_name: layer.adapters[adapter_name]
            for layer in self.mixture_layers()
            if adapter_name in layer.adapters
        }

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts; 4-bit weights count as their unpacked size."""
        trainable = total = 0
        for param in self.parameters():
            count = param.numel() * (2 if type(param).__name__ == "Params4bit" else 1)
            total += count
            trainable += count if param.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Log the trainable parameter count, like PEFT's method of the same name."""
        trainable, total = self.get_nb_trainable_parameters()
        message = (
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )
        logger.info(message)
        print(message)  # noqa: T201 - PEFT's method prints; users call it for this output

    # -- merging (moa.merge) ---------------------------------------------------------------

    def merge_and_unload(
        self,
        adapter_names: str | Sequence[str] | Mapping[str, float] | None = None,
        weights: Sequence[float] | None = None,
        *,
        progress: bool = True,
        sample_input_ids: torch.Tensor | None = None,
        return_report: bool = False,
    ) -> Any:
        """Fold the active adapters (or the given mixture) into the base and return the plain
        transformers model; this MixtureModel must not be used afterwards.

        See :func:`moa.merge.merge_and_unload` (NF4 bases are re-quantized and the error
        this introduces is measured in the returned report).
        """
        from moa.merge.into_base import merge_and_unload

        return merge_and_unload(self, adapter_names, weights, progress=progress,
                                sample_input_ids=sample_input_ids, return_report=return_report)

    def merge_into_base(
        self,
        adapter_name: str | Sequence[str] | Mapping[str, float] | None = None,
        weights: Sequence[float] | None = None,
        *,
        keep_adapters: bool = False,
        sample_input_ids: torch.Tensor | None = None,
        progress: bool = True,
    ) -> Any:
        """Add an adapter (or weighted mixture) to the base weights in place.

        Returns a :class:`moa.merge.MergeReport`. The merged adapters leave the bank unless
        ``keep_adapters=True`` (then they stay loaded but inactive), so nothing is applied twice.
        """
        from moa.merge.into_base import merge_into_base

        return merge_into_base(self, adapter_name, weights, keep_adapters=keep_adapters,
                               sample_input_ids=sample_input_ids, progress=progress)

    # -- routing ---------------------------------------------------------------------------

    def set_router(self, router: Router | None) -> None:
        """Let ``router`` decide the adapters of rows that name none (``None`` removes it)."""
        if router is not None and not isinstance(router, Router):
            raise RoutingError(
                f"set_router needs a moa.Router instance (or None); got {type(router).__name__}. "
                f"Get a router class with moa.get_router(name) and instantiate it."
            )
        self._routing.router_changed(router)
        self._router = router

    def route(self, prompts: Sequence[str] | torch.Tensor) -> list[dict[str, float]]:
        """The router's decision per request, as ``[{adapter: weight}, ...]`` (telemetry)."""
        if self._router is None:
            raise RoutingError("No router is set. Call model.set_router(router) first.")
        texts = None
        if isinstance(prompts, torch.Tensor):
            input_ids, attention_mask = prompts.to(self.device), None
        else:
            texts = list(prompts)
            encoded = self._tokenize(texts)
            input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        router = self._router
        hidden = None
        if router.hidden_layer is not None:
            hidden = self._routing.hidden_states_at(router.hidden_layer, input_ids, attention_mask)
        decision = self._routing.decide(
            router, int(input_ids.shape[0]), input_ids=input_ids, hidden_states=hidden,
            attention_mask=attention_mask, texts=texts,
        )
        if decision.level == "token":
            return _token_decision_per_row(decision, input_ids.shape, self.adapter_names)
        return decision.to_mixtures(self.adapter_names)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        adapter_names: Sequence[str | None] | None = None,
        adapter_weights: Sequence[Mixture] | Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the base with adapters chosen per row.

        Args:
            input_ids: ``[B, S]`` token ids.
            attention_mask: ``[B, S]``.
            adapter_names: One adapter name (or ``None`` / ``"__base__"`` = base) per row.
            adapter_weights: One ``{name: weight}`` mixture (or ``None``) per row, or one
                dict for every row.
            **kwargs: Passed to the transformers model (``labels``, ``past_key_values``...).

        Without ``adapter_names``/``adapter_weights`` the router decides (if set), else
        the adapters given to :meth:`set_adapter`.
        """
        pinned = self._pinned_routing(input_ids, attention_mask, adapter_names, adapter_weights, kwargs)
        with self._routing.pin(pinned):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        adapter_names: Sequence[str | None] | None = None,
        adapter_weights: Sequence[Mixture] | Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``transformers`` generate with per-row adapters; the KV cache stays on.

        The routing decision of each row is made once from the prompt and reused for
        every generated token (rows expanded for beams keep their row's decision).
        """
        pinned = self._pinned_routing(input_ids, attention_mask, adapter_names, adapter_weights, kwargs)
        with self._routing.pin(pinned):
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def resolve_routing(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        adapter_names: Sequence[str | None] | None,
        adapter_weights: Sequence[Mixture] | Mapping[str, float] | None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> RoutingDecision | None:
        """The decision a forward with these arguments uses (``None`` = base only)."""
        batch = _batch_size(input_ids, model_kwargs or {})
        if adapter_names is not None and adapter_weights is not None:
            raise RoutingError("Pass adapter_names or adapter_weights, not both.")
        if adapter_names is not None:
            if isinstance(adapter_names, str):
                raise RoutingError(
                    f"adapter_names must be a list with one entry per row, got the string "
                    f"{adapter_names!r}. Use [{adapter_names!r}] * batch_size or set_adapter()."
                )
            _check_rows("adapter_names", len(adapter_names), batch)
            names = [None if n == BASE_ROW else n for n in adapter_names]
            return RoutingDecision.from_names(names, self.adapter_names)
        if adapter_weights is not None:
            rows = [adapter_weights] * batch if isinstance(adapter_weights, Mapping) else list(adapter_weights)
            _check_rows("adapter_weights", len(rows), batch)
            return RoutingDecision.from_mixtures(rows, self.adapter_names)
        if self._router is not None and input_ids is not None:
            if self._router.hidden_layer is not None:
                raise RoutingError(
                    f"Router {self._router!r} decides from hidden states inside the forward; "
                    f"call the model (or model.route) rather than resolve_routing."
                )
            return self._routing.decide(
                self._router, batch, input_ids=input_ids, attention_mask=attention_mask
            )
        return self._active_decision(batch)

    def _pinned_routing(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        adapter_names: Sequence[str | None] | None,
        adapter_weights: Sequence[Mixture] | Mapping[str, float] | None,
        model_kwargs: Mapping[str, Any],
    ) -> Pinned:
        explicit = adapter_names is not None or adapter_weights is not None
        router = self._router
        if not explicit and router is not None and router.hidden_layer is not None:
            _batch_size(input_ids, model_kwargs)
            return Pinned(decision=None, router=router, attention_mask=attention_mask,
                          first_layer=router.hidden_layer)
        decision = self.resolve_routing(input_ids, attention_mask, adapter_names, adapter_weights, model_kwargs)
        return Pinned(decision=decision)

    # -- internals -------------------------------------------------------------------------

    def _adapter_type(self, name: str):
        from moa.plugin import get_adapter_type

        return get_adapter_type(name)

    def _base_layer(self, module_name: str) -> nn.Module:
        module = self.base_model.get_submodule(module_name)
        return module.base_layer if isinstance(module, MixtureLinear) else module

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME_PATTERN.match(name) or name == BASE_ROW:
            raise AdapterExistsError(
                f"Invalid adapter name {name!r}: use letters, digits, '_' and '-' only "
                f"(and not {BASE_ROW!r})."
            )
        if hasattr(nn.ModuleDict(), name):  # the per-layer bank is an nn.ModuleDict
            raise AdapterExistsError(
                f"Invalid adapter name {name!r}: it is the name of a torch module attribute "
                f"(like 'train' or 'forward'). Pick another, e.g. {name + '_adapter'!r}."
            )
        if name in self.peft_config:
            raise AdapterExistsError(
                f"An adapter named {name!r} is already loaded. Loaded: "
                f"{format_choices(self.adapter_names)}. Pick another adapter_name or "
                f"delete_adapter({name!r}) first."
            )

    def _check_known(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.peft_config:
                raise UnknownAdapterError(
                    f"No adapter named {name!r}. Loaded: {format_choices(self.adapter_names)}. "
                    f"Load it with model.load_adapter(path, adapter_name={name!r})."
                )

    def _install(
        self, name: str, config: AdapterConfig, layers: Mapping[str, AdapterLayer], trainable: bool
    ) -> None:
        """Attach fully built and checked layers; the only place the bank changes."""
        for module_name, layer in layers.items():
            low_rank = layer.low_rank()
            if low_rank is not None and low_rank[0].shape[0] > self.max_rank:
                raise AdapterShapeError(
                    f"Adapter {name!r} has rank {low_rank[0].shape[0]} on {module_name!r}, above "
                    f"this model's cap max_rank={self.max_rank}. Raise it with "
                    f"MixtureModel.from_pretrained(..., max_rank=...)."
                )
        for module_name, layer in layers.items():
            base_layer = self._base_layer(module_name)
            weight = next(base_layer.parameters())
            layer.to(device=weight.device)
            layer.attach_base(base_layer)
            layer.requires_grad_(trainable)
            wrapper = self.base_model.get_submodule(module_name)
            if not isinstance(wrapper, MixtureLinear):
                wrapper = MixtureLinear(base_layer, module_name, self._state)
                parent_name, _, child = module_name.rpartition(".")
                setattr(self.base_model.get_submodule(parent_name), child, wrapper)
            wrapper.add_adapter_layer(name, layer)
        self.peft_config[name] = config
        self._state.adapter_names.append(name)
        self._state.layout_version += 1
        if not self.active_adapters:
            self.active_adapters = [name]
        logger.info("Adapter %r ready on %d modules.", name, len(layers))

    def _active_decision(self, batch: int) -> RoutingDecision | None:
        if not self.active_adapters or batch == 0:
            return None
        mixture = {name: 1.0 for name in self.active_adapters}
        return RoutingDecision.from_mixtures([mixture] * batch, self.adapter_names)

    def _tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise RoutingError("This model has no tokenizer; pass token ids instead of text.")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        encoded = self.tokenizer(list(texts), return_tensors="pt", padding=True)
        return {k: v.to(self.device) for k, v in encoded.items()}


def _batch_size(input_ids: torch.Tensor | None, model_kwargs: Mapping[str, Any]) -> int:
    if input_ids is not None:
        return int(input_ids.shape[0])
    embeds = model_kwargs.get("inputs_embeds")
    if embeds is not None:
        return int(embeds.shape[0])
    raise RoutingError("Give input_ids (or inputs_embeds) so rows can be routed.")


def _check_rows(what: str, rows: int, batch: int) -> None:
    if rows != batch:
        raise RoutingError(
            f"{what} has {rows} entries but the batch has {batch} rows. Give exactly one entry "
            f"per row of input_ids (None = base model for that row)."
        )


def _token_decision_per_row(
    decision: RoutingDecision, shape: torch.Size, adapter_names: Sequence[str]
) -> list[dict[str, float]]:
    """Average a token-level decision over each row's tokens."""
    batch, seq_len = int(shape[0]), int(shape[1])
    mixtures = decision.to_mixtures(adapter_names)
    rows = []
    for b in range(batch):
        total: dict[str, float] = {}
        for mix in mixtures[b * seq_len : (b + 1) * seq_len]:
            for name, weight in mix.items():
                total[name] = total.get(name, 0.0) + weight / seq_len
        rows.append(total)
    return rows
