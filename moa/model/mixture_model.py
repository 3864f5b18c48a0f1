"""MixtureModel: one base model, many adapters, mixed per request with PEFT's API.

Thread safety: every call (``forward``, ``generate``, ``route``, ``hidden_states_at``)
carries its own routing in a :mod:`contextvars` context (see
:mod:`moa.model.call_routing`), so calls from several threads at once return exactly
what the same calls return one after another. Adding or removing adapters waits for
the running calls to finish (:class:`~moa.model.AdapterBank`); ``set_adapter`` and
``set_router`` change the default of the calls that start afterwards.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from moa.adapters.base import AdapterConfig, AdapterLayer
from moa.adapters.input_level import InputAdapterConfig
from moa.errors import RoutingError
from moa.model import adapter_io, input_adapter_io, virtual_inputs
from moa.model.adapter_bank import DEFAULT_MAX_ADAPTERS, AdapterBank
from moa.model.call_routing import (
    CallFrame,
    CallPlan,
    adapters_disabled,
    calling,
    disabling,
)
from moa.model.finite_logits import install_logits_check
from moa.model.input_adapter_set import InputAdapterSet
from moa.model.input_rows import InputRows, split_input_rows
from moa.model.limits import check_generation_lengths
from moa.model.mixture_linear import MixtureLinear
from moa.model.routing_controller import RoutingController, ask_router
from moa.model.row_requests import RowRequest, batch_size, plan_call, token_decision_per_row
from moa.model.targets import linear_features, resolve_target_modules
from moa.model.trainer_support import TrainerSupport
from moa.routing.decision import RoutingDecision
from moa.routing.router import Router


class MixtureModel(TrainerSupport, nn.Module):
    """A causal LM whose linear layers carry a bank of adapters, mixed per row or token.

    Build with :meth:`from_pretrained`, then use PEFT's verbs (``add_adapter``,
    ``load_adapter``, ``set_adapter``, ``adapter_names=`` per row) or moa's
    (``adapter_weights=`` per row, ``set_router``, ``"auto"`` rows). Input-level adapters
    (prompt / prefix tuning, from plugins) share every call with the Linear-level ones; see
    :mod:`moa.model.input_rows` for how a row combines them.

    Args:
        base_model: A transformers causal LM (dense or bitsandbytes NF4).
        tokenizer: Its tokenizer (needed only to route text; token ids work without).
        max_rank: Largest adapter rank accepted (bigger ones raise AdapterShapeError).
        max_adapters: Most adapters loaded at once (one more raises InputLimitError).
    """

    def __init__(
        self, base_model: nn.Module, tokenizer: Any = None, max_rank: int = 256,
        max_adapters: int = DEFAULT_MAX_ADAPTERS,
    ):
        super().__init__()
        from moa.model.base_loading import base_fingerprint  # heavy deps, imported late

        base_model.requires_grad_(False)  # only adapters train, as in PEFT
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.base_fingerprint = base_fingerprint(base_model)
        self.bank = AdapterBank(base_model, max_rank=max_rank, max_adapters=max_adapters)
        self.active_adapters: list[str] = []
        self._router: Router | None = None
        self._controller = RoutingController(self.bank, self._default_plan)
        self._logits_check = install_logits_check(self.bank, base_model)
        self.input_adapters = InputAdapterSet()
        self._virtual_hook = virtual_inputs.install_virtual_input_hook(self.bank, base_model)
        self.train(base_model.training)  # a base loaded for inference stays in eval mode

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
        """Loaded adapters: the Linear-level ones in slot order, then the input-level ones."""
        return [*self.bank.names, *self.input_adapters.names]

    @property
    def peft_config(self) -> dict[str, AdapterConfig | InputAdapterConfig]:
        """Adapter name -> its config (PEFT's attribute), input-level adapters included."""
        return {**self.bank.configs, **self.input_adapters.configs}

    @property
    def max_rank(self) -> int:
        """Largest adapter rank accepted."""
        return self.bank.max_rank

    @property
    def active_adapter(self) -> str | list[str] | None:
        """PEFT's spelling: the active adapter's name (a list when several are active)."""
        if not self.active_adapters:
            return None
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    @property
    def config(self) -> Any:
        """The base model's transformers config."""
        return self.base_model.config

    @property
    def generation_config(self) -> Any:
        """The base model's generation config (PEFT's model exposes it too; TRL's SFTTrainer sets ids on it)."""
        return self.base_model.generation_config

    def add_model_tags(self, tags: str | list[str]) -> None:
        """Tag the base model's model card (transformers' and PEFT's method; TRL's trainers call it)."""
        self.base_model.add_model_tags(tags)

    @property
    def device(self) -> torch.device:
        """Device of the base model's first parameter."""
        return next(self.base_model.parameters()).device

    @property
    def router(self) -> Router | None:
        """The router set with :meth:`set_router`, if any."""
        return self._router

    def get_base_model(self) -> nn.Module:
        """The transformers model underneath (its linear layers wrapped by moa), as in PEFT."""
        return self.base_model

    def get_input_embeddings(self) -> nn.Module:
        """The base's token embedding, as transformers models (and PEFT, by delegation) answer it."""
        return self.base_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        """The base's LM head (trainers such as TRL's read it to fuse the loss with the head)."""
        return self.base_model.get_output_embeddings()

    def mixture_layers(self) -> Iterator[MixtureLinear]:
        """Every wrapped layer."""
        return self.bank.layers()

    # -- adapters --------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        """Create a new adapter (initialised by its config) on the modules it targets.

        ``target_modules=None`` picks PEFT's default modules for the base's architecture.
        An :class:`~moa.adapters.input_level.InputAdapterConfig` adds an input-level adapter.
        """
        from moa.plugin import get_adapter_type, get_input_adapter_type

        self._check_new_name(adapter_name)
        if isinstance(config, InputAdapterConfig):
            adapter = self.input_adapters.build(get_input_adapter_type(config.adapter_type), config, self.base_model)
            adapter.initialize(self.base_model, self.tokenizer)
            self._install_input(adapter_name, adapter, trainable=True)
            return
        config.validate()
        spec = get_adapter_type(config.adapter_type)
        modules = resolve_target_modules(self.base_model, config.target_modules)
        layers = {m: spec.layer_class(config, m, *linear_features(self.bank.base_layer(m))) for m in modules}
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
        from moa.hub.sources import resolve_adapter_folder  # PEFT's habit: a Hub id works too

        self._check_new_name(adapter_name)
        folder = resolve_adapter_folder(path_or_repo_id, revision, max_rank=self.max_rank)
        if (adapter := input_adapter_io.read_input_adapter(self, folder)) is not None:  # an input-level adapter
            self._install_input(adapter_name, adapter, trainable=is_trainable)
            return
        config, layers = adapter_io.read_adapter(self, folder)
        self._install(adapter_name, config, layers, trainable=is_trainable)

    def install_adapter(
        self, adapter_name: str, config: AdapterConfig, layers: Mapping[str, AdapterLayer], trainable: bool = False
    ) -> None:
        """Attach adapter layers built elsewhere (``moa.merge``, plugins) as ``adapter_name``.

        Args:
            adapter_name: New adapter name.
            config: Its config.
            layers: Module name -> a built :class:`~moa.adapters.AdapterLayer`.
            trainable: Whether its parameters require gradients.
        """
        self._install(adapter_name, config, layers, trainable=trainable)

    def save_adapter(self, adapter_name: str, directory: str | os.PathLike) -> None:
        """Write ``adapter_name`` as a PEFT folder (atomically); PEFT loads it as it is."""
        if adapter_name in self.input_adapters:
            input_adapter_io.write_input_adapter(self, adapter_name, directory)
            return
        self.bank.check_known([adapter_name])
        adapter_io.write_adapter(self, adapter_name, directory)

    def save_pretrained(
        self, save_directory: str | os.PathLike, selected_adapters: Sequence[str] | None = None, **kwargs: Any
    ) -> None:
        """PEFT's multi-adapter layout: the first adapter at the root, the others in subfolders.

        See :func:`moa.hub.pretrained.save_pretrained`.
        """
        from moa.hub.pretrained import save_pretrained

        save_pretrained(self, save_directory, selected_adapters=selected_adapters, **kwargs)

    def load_pretrained_adapters(self, directory_or_repo_id: str | os.PathLike, **kwargs: Any) -> list[str]:
        """Load every adapter of a :meth:`save_pretrained` folder or Hub repo (all or none).

        See :func:`moa.hub.pretrained.load_pretrained_adapters` (``revision``, ``is_trainable``...).
        """
        from moa.hub.pretrained import load_pretrained_adapters

        return load_pretrained_adapters(self, directory_or_repo_id, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Push :meth:`save_pretrained`'s layout to the Hub in one commit.

        See :func:`moa.hub.pretrained.push_to_hub` for the options.
        """
        from moa.hub.pretrained import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    def push_adapter(self, adapter_name: str, repo_id: str, **kwargs: Any) -> Any:
        """Push one adapter to the Hub: PEFT layout + model card, in one commit.

        See :func:`moa.hub.push_adapter` for the options (``revision``, ``private``,
        ``commit_message``, model-card fields); returns its ``PushResult``.
        """
        from moa.hub import push_adapter

        self.bank.check_known([adapter_name])
        return push_adapter(self, adapter_name, repo_id, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its weights (a Linear-level one waits for running calls; running calls
        that use an input-level one keep it until they end)."""
        (self.input_adapters if adapter_name in self.input_adapters else self.bank).remove(adapter_name)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make ``adapter_name`` (or several, summed with weight 1 each) the default for every row."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self.bank.check_known([n for n in names if n not in self.input_adapters])
        self.active_adapters = names

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Within the block, this thread's (this context's) calls run the base alone.

        Calls running in other threads keep their adapters: the switch is per context,
        like every other piece of a call's routing.
        """
        with disabling(self.bank):
            yield

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        """PEFT's spelling of :meth:`disable_adapters` (``with model.disable_adapter(): ...``)."""
        return self.disable_adapters()

    def adapter_layers(self, adapter_name: str) -> dict[str, AdapterLayer]:
        """Module name -> this adapter's layer on that module."""
        return self.bank.adapter_layers(adapter_name)

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

    def unload(self) -> nn.Module:
        """Remove every adapter and moa's hooks without merging; return the plain base (PEFT's
        ``unload``). This MixtureModel must not be used afterwards."""
        self._router = None
        self.bank.unwrap_all()
        self._controller.remove()
        self._virtual_hook.remove()
        if self._logits_check is not None:
            self._logits_check.remove()
        self.active_adapters = []
        return self.base_model

    # -- routing ---------------------------------------------------------------------------

    def set_router(self, router: Router | None) -> None:
        """Let ``router`` decide the rows that ask for it (``"auto"``) and, when a call names
        no adapter at all, every row. ``None`` removes it."""
        self._check_router(router)
        self._router = router

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Encode prompts with padding: ``{"input_ids", "attention_mask"}`` on the model's device."""
        if self.tokenizer is None:
            raise RoutingError(
                "This model has no tokenizer (its base folder has none), so it cannot encode text. "
                "Pass token ids instead, or load a base folder that includes tokenizer files."
            )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        encoded = self.tokenizer(list(texts), return_tensors="pt", padding=True)
        return {k: v.to(self.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}

    def hidden_states_at(
        self,
        layer: int | Sequence[int],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | dict[int, torch.Tensor]:
        """The base's input to decoder ``layer`` (no adapters), by a partial pass: ``[B, S, H]``.

        Give a list of layers to get ``{layer: hidden}`` from one pass; ``kwargs`` (such as
        ``position_ids``) go to the base. Safe to call from several threads at once.
        """
        with self.bank.reading():
            if isinstance(layer, int):
                return self._controller.hidden_states_at([layer], input_ids, attention_mask, **kwargs)[layer]
            return self._controller.hidden_states_at(layer, input_ids, attention_mask, **kwargs)

    def route(
        self,
        prompts: Sequence[str] | torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        adapter_names: Sequence[str | None] | None = None,
        adapter_weights: Sequence[RowRequest] | Mapping[str, float] | None = None,
        router: Router | None = None,
    ) -> list[dict[str, float]]:
        """The decision each row gets, as ``[{adapter: weight}, ...]`` (telemetry).

        Rows are given as in :meth:`forward`; only the routed rows (all rows when no
        names/weights are given) go to the router, the others report their explicit mixture.
        A token-level decision is averaged over each row's tokens.
        """
        texts = None
        if isinstance(prompts, torch.Tensor):
            input_ids = prompts.to(self.device)
        else:
            texts = list(prompts)
            encoded = self.tokenize(texts)
            input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        if adapter_names is None and adapter_weights is None and (router or self._router) is None:
            raise RoutingError("No router is set. Call model.set_router(router) first (or pass router=).")
        with self.bank.reading():
            names = self.bank.names
            plan = self._plan(input_ids, adapter_names, adapter_weights, router, {})
            rows = plan.explicit.to_mixtures(names) if plan.explicit is not None else [{}] * len(input_ids)
            if not plan.routed_rows:
                return rows
            index = torch.tensor(plan.routed_rows, dtype=torch.long, device=input_ids.device)
            ids = input_ids.index_select(0, index)
            mask = attention_mask.index_select(0, index.to(attention_mask.device)) if attention_mask is not None else None
            hidden = None
            if plan.router.hidden_layer is not None:
                layer = plan.router.hidden_layer
                hidden = self._controller.hidden_states_at([layer], ids, mask)[layer]
            decision = ask_router(
                plan.router, names, len(plan.routed_rows), input_ids=ids, hidden_states=hidden,
                attention_mask=mask, texts=[texts[i] for i in plan.routed_rows] if texts is not None else None,
            )
        decided = decision.to_mixtures(names)
        if decision.level == "token":
            decided = token_decision_per_row(decided, len(plan.routed_rows), int(ids.shape[1]))
        for row, mixture in zip(plan.routed_rows, decided, strict=True):
            rows[row] = mixture
        return rows

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        adapter_names: Sequence[str | None] | None = None,
        adapter_weights: Sequence[RowRequest] | Mapping[str, float] | None = None,
        router: Router | None = None,
        routing_decision: RoutingDecision | None = None,
        adapters_from_layer: int | Sequence[int] = 0,
        check_finite: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Run the base with adapters chosen per row.

        Args:
            input_ids: ``[B, S]`` token ids.
            attention_mask: ``[B, S]``.
            adapter_names: One entry per row: an adapter name, ``None`` / ``"__base__"``
                (the base alone) or ``"auto"`` (the router decides that row).
            adapter_weights: One entry per row: a ``{name: weight}`` mixture (any ranks, any
                number of adapters), ``None`` (base) or ``"auto"``; or one dict for every row.
            router: Use this router for this call instead of the model's.
            routing_decision: A ready :class:`RoutingDecision` for every row (a gate being
                trained passes its differentiable one), applied from ``adapters_from_layer`` on.
            adapters_from_layer: See ``routing_decision``; one layer per row is allowed (at
                most two distinct values, the smaller 0), so a router-decided row pinned for
                later steps keeps the router's layer while named rows use every layer. With a
                token-level decision, one layer per token is allowed too (several requests
                packed into one sequence, as the serving engine's prefill does).
            check_finite: Raise :class:`~moa.errors.NonFiniteOutputError` when a row that
                adapters computed gets NaN or infinite logits (see :mod:`moa.model.finite_logits`);
                ``False`` returns them for the caller to handle.
            **kwargs: Passed to the transformers model (``labels``, ``past_key_values``...).

        With none of these, the router decides every row (if one is set), else the
        adapters given to :meth:`set_adapter` apply.
        """
        with self.bank.reading():
            rows = self._input_rows(input_ids, adapter_names, adapter_weights, router, kwargs, routing_decision)
            if rows is not None:  # input-level adapters in some rows: the others as Linear-level requests
                adapter_names, adapter_weights = None, rows.linear
            plan = self._plan(input_ids, adapter_names, adapter_weights, router, kwargs,
                              routing_decision, adapters_from_layer)
            frame = CallFrame(self.bank, plan, self.bank.names, check_finite=check_finite)
            if rows is not None:
                return virtual_inputs.run_forward(self.base_model, frame, rows.virtual, input_ids, attention_mask,
                                                  kwargs, check_finite)
            with calling(frame):
                return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        adapter_names: Sequence[str | None] | None = None,
        adapter_weights: Sequence[RowRequest] | Mapping[str, float] | None = None,
        router: Router | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``transformers`` generate with per-row adapters; the KV cache stays on.

        Rows are given as in :meth:`forward`. A routed row's decision is made once from its
        prompt and reused for every generated token (token-level routers decide each new
        token); rows expanded for beams keep their row's decision.

        Raises:
            InputLimitError: the prompt, or prompt + ``max_new_tokens`` (``max_length``), is longer
                than the base's context; checked before anything runs.
            NonFiniteOutputError: a row that adapters computed got NaN or infinite logits at
                some step (see :meth:`forward`'s ``check_finite``).
        """
        check_generation_lengths(self.config, input_ids, kwargs)  # before any work starts
        with self.bank.reading():
            rows = self._input_rows(input_ids, adapter_names, adapter_weights, router, kwargs)
            if rows is not None:
                adapter_names, adapter_weights = None, rows.linear
            plan = self._plan(input_ids, adapter_names, adapter_weights, router, kwargs)
            frame = CallFrame(self.bank, plan, self.bank.names)
            if rows is not None:
                return virtual_inputs.run_generate(self.base_model, frame, rows.virtual, input_ids, attention_mask,
                                                   kwargs)
            with calling(frame):
                return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # -- internals -------------------------------------------------------------------------

    def _install(
        self, name: str, config: AdapterConfig, layers: Mapping[str, AdapterLayer], trainable: bool
    ) -> None:
        self._check_new_name(name)
        self.bank.install(name, config, layers, trainable)
        if not self.active_adapters:
            self.active_adapters = [name]

    def _install_input(self, name: str, adapter: Any, trainable: bool) -> None:
        self._check_new_name(name)
        self.input_adapters.install(name, adapter, self.device, trainable, self.base_model.training)
        self.active_adapters = self.active_adapters or [name]

    def _check_new_name(self, name: str) -> None:
        self.bank.check_new_name(name)  # a valid name, free among the Linear-level adapters, below the cap
        self.input_adapters.check_new_name(name)

    def _input_rows(self, input_ids: torch.Tensor | None, adapter_names: Any, adapter_weights: Any,
                    router: Router | None, model_kwargs: Mapping[str, Any],
                    pinned: RoutingDecision | None = None) -> InputRows | None:
        """The call's rows split into input-level and Linear-level requests (``None``: no input-level row)."""
        if not len(self.input_adapters) or adapters_disabled(self.bank) or pinned is not None:
            return None
        router = router if router is not None else self._router
        return split_input_rows(self.input_adapters.snapshot(), batch_size(input_ids, model_kwargs),
                                adapter_names=adapter_names, adapter_weights=adapter_weights,
                                active_adapters=self.active_adapters, router=router)

    def _check_router(self, router: Router | None) -> None:
        if router is None:
            return
        if not isinstance(router, Router):
            raise RoutingError(
                f"A router must be a moa.Router instance (or None); got {type(router).__name__}. "
                f"Get a router class with moa.get_router(name) and instantiate it."
            )
        self._controller.check_router(router)

    def _default_plan(self, batch: int) -> CallPlan:
        # a direct base_model(...) call has no room for virtual positions: Linear-level adapters only
        active = [name for name in self.active_adapters if name not in self.input_adapters]
        explicit = None
        if active and batch > 0:
            explicit = RoutingDecision.from_mixtures([dict.fromkeys(active, 1.0)] * batch, self.bank.names)
        return CallPlan(explicit=explicit, enabled=not adapters_disabled(self.bank))

    def _plan(
        self,
        input_ids: torch.Tensor | None,
        adapter_names: Sequence[str | None] | None,
        adapter_weights: Sequence[RowRequest] | Mapping[str, float] | None,
        router: Router | None,
        model_kwargs: Mapping[str, Any],
        routing_decision: RoutingDecision | None = None,
        adapters_from_layer: int | Sequence[int] = 0,
    ) -> CallPlan:
        """Check the call's routing arguments and turn them into its :class:`CallPlan`."""
        self._check_router(router)
        return plan_call(
            self.bank.names,
            batch_size(input_ids, model_kwargs),
            adapter_names=adapter_names,
            adapter_weights=adapter_weights,
            router=router if router is not None else self._router,
            active_adapters=[name for name in self.active_adapters if name not in self.input_adapters],
            enabled=not adapters_disabled(self.bank),
            routing_decision=routing_decision,
            adapters_from_layer=adapters_from_layer,
        )
