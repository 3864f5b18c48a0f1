"""The routing of one model call, carried in a :mod:`contextvars` context.

Each ``forward``/``generate``/``route`` call builds one :class:`CallPlan` and runs the
base inside :func:`calling`, which puts a :class:`CallFrame` in a context variable. The
hooks and every :class:`~moa.model.MixtureLinear` read the frame of *their* model from
that variable. Threads (and asyncio tasks) each have their own context, so concurrent
calls never see each other's decisions; a call inside a call (a router's partial pass)
pushes a frame of its own and pops it when done. Nothing about a call is kept on the
model, which is what makes concurrent calls return exactly the serial results.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from moa.kernels.metadata import RoutingMetadata
from moa.routing.decision import RoutingDecision
from moa.routing.router import Router


@dataclass
class CallPlan:
    """How the rows of one call are routed.

    Attributes:
        explicit: Row-level decision of the rows decided up front (names, mixtures,
            ``set_adapter``), -1 on base rows and on rows left to the router; ``None`` =
            no adapter on any row before the router speaks.
        routed_rows: Rows the router decides (empty: none).
        router: The router deciding ``routed_rows`` (``None`` when there are none).
        split_layer: Adapters decided by the router (or given in ``late``) apply from this
            decoder layer on; explicit rows use theirs everywhere.
        late: The decision of every row from ``split_layer`` on, once known (a
            sequence-level router's decision is cached here for later generate steps).
        enabled: ``False`` inside ``disable_adapters()`` (every row runs the base).
    """

    explicit: RoutingDecision | None
    routed_rows: tuple[int, ...] = ()
    router: Router | None = None
    split_layer: int = 0
    late: RoutingDecision | None = None
    enabled: bool = True

    @property
    def needs_router(self) -> bool:
        """Whether the router still has to decide in the next forward."""
        if not self.routed_rows or self.router is None:
            return False
        return self.late is None or self.router.level == "token"


@dataclass
class CallFrame:
    """One call's plan plus the state of its current forward (never shared between calls).

    Attributes:
        owner: The model's bank (frames of other models are ignored).
        plan: The call's routing plan.
        adapter_names: The bank's slots when the call began.
        capture_layers: For partial passes: capture the input of these decoder layers and
            stop before the last one.
        captured: Layer -> the hidden states captured there.
        early: Metadata for layers ``< plan.split_layer``.
        late: Metadata for layers ``>= plan.split_layer``.
        backend: The kernel module chosen once for this forward.
        check_finite: Raise if a row that adapters computed gets NaN or infinite logits
            (:mod:`moa.model.finite_logits`).
    """

    owner: object
    plan: CallPlan
    adapter_names: tuple[str, ...]
    capture_layers: tuple[int, ...] = ()
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    early: RoutingMetadata | None = None
    late: RoutingMetadata | None = None
    backend: ModuleType | None = None
    scratch: dict[str, Any] = field(default_factory=dict)
    check_finite: bool = True

    def metadata_for(self, layer_index: int | None) -> RoutingMetadata | None:
        """The metadata a layer uses: ``early`` below the split layer, ``late`` from it on."""
        if layer_index is not None and layer_index < self.plan.split_layer:
            return self.early
        return self.late


_FRAMES: contextvars.ContextVar[tuple[CallFrame, ...]] = contextvars.ContextVar("moa_call_frames", default=())
_DISABLED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("moa_disabled", default=frozenset())


def current_frame(owner: object) -> CallFrame | None:
    """The innermost frame of ``owner``'s calls in this context, if any."""
    for frame in reversed(_FRAMES.get()):
        if frame.owner is owner:
            return frame
    return None


@contextlib.contextmanager
def calling(frame: CallFrame) -> Iterator[CallFrame]:
    """Make ``frame`` the current call of its owner inside the block (this context only)."""
    token = enter(frame)
    try:
        yield frame
    finally:
        leave(token)


def enter(frame: CallFrame) -> contextvars.Token:
    """Push ``frame`` (for hooks that cannot use :func:`calling`); undo with :func:`leave`."""
    return _FRAMES.set((*_FRAMES.get(), frame))


def leave(token: contextvars.Token) -> None:
    """Pop the frame pushed by :func:`enter`."""
    _FRAMES.reset(token)


def adapters_disabled(owner: object) -> bool:
    """Whether ``owner``'s adapters are off in this context (``disable_adapters()``)."""
    return id(owner) in _DISABLED.get()


@contextlib.contextmanager
def disabling(owner: object) -> Iterator[None]:
    """Turn ``owner``'s adapters off for the calls made in this context inside the block."""
    token = _DISABLED.set(_DISABLED.get() | {id(owner)})
    try:
        yield
    finally:
        _DISABLED.reset(token)


def checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` for non-reentrant ``torch.utils.checkpoint``.

    The backward pass recomputes checkpointed layers outside the call that ran them (in
    the thread that calls ``backward``), where the call's frame is gone; this hands the
    recomputation the frames (and adapter switches) the forward saw.
    """
    frames, disabled = _FRAMES.get(), _DISABLED.get()

    @contextlib.contextmanager
    def restoring() -> Iterator[None]:
        frames_token, disabled_token = _FRAMES.set(frames), _DISABLED.set(disabled)
        try:
            yield
        finally:
            _DISABLED.reset(disabled_token)
            _FRAMES.reset(frames_token)

    return contextlib.nullcontext(), restoring()


def _pad_k(ids: torch.Tensor, weights: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = k - ids.shape[1]
    if extra <= 0:
        return ids, weights
    pad_ids = torch.full((ids.shape[0], extra), -1, dtype=ids.dtype, device=ids.device)
    pad_w = torch.zeros((ids.shape[0], extra), dtype=weights.dtype, device=weights.device)
    return torch.cat([ids, pad_ids], 1), torch.cat([weights, pad_w], 1)


def expand_rows(rows: Sequence[int], batch: int, decided_batch: int) -> list[int]:
    """Row indices of a ``decided_batch``-row request in a batch whose rows were repeated
    ``batch // decided_batch`` times consecutively (beams, ``num_return_sequences``)."""
    repeat = max(batch // max(decided_batch, 1), 1)
    return [r * repeat + i for r in rows for i in range(repeat)]


def combine(
    explicit: RoutingDecision | None,
    routed: RoutingDecision,
    routed_rows: Sequence[int],
    batch: int,
    seq_len: int,
) -> RoutingDecision:
    """One decision for the whole batch: ``routed`` on ``routed_rows``, ``explicit`` elsewhere.

    Args:
        explicit: Row-level decision of every row (routed rows -1), or ``None`` (base).
        routed: The router's decision for ``routed_rows`` (in that order), row or token level.
        routed_rows: Indices of the routed rows in the batch of ``batch`` rows.
        batch: Rows in the batch.
        seq_len: Tokens per row in this forward.

    Returns:
        A row-level decision when ``routed`` is row level, else a token-level one. The
        routed weights stay on the autograd graph (a gate trains through them).
    """
    device = routed.ids.device
    token_level = routed.level == "token"
    if explicit is None:
        base_ids = torch.full((batch, 1), -1, dtype=torch.int32, device=device)
        base_w = torch.zeros((batch, 1), dtype=torch.float32, device=device)
    else:
        base_ids, base_w = explicit.to(device).for_tokens(batch, 1)
    k = max(base_ids.shape[1], routed.k)
    base_ids, base_w = _pad_k(base_ids, base_w, k)
    r_ids, r_w = _pad_k(routed.ids, routed.weights.to(base_w.dtype), k)
    index = torch.tensor(list(routed_rows), dtype=torch.long, device=device)
    if token_level:
        base_ids = base_ids.repeat_interleave(seq_len, 0).view(batch, seq_len, k)
        base_w = base_w.repeat_interleave(seq_len, 0).view(batch, seq_len, k)
        r_ids, r_w = r_ids.view(len(routed_rows), seq_len, k), r_w.view(len(routed_rows), seq_len, k)
    ids = base_ids.index_copy(0, index, r_ids.to(base_ids.dtype))
    weights = base_w.index_copy(0, index, r_w)
    if token_level:
        return RoutingDecision(ids.reshape(-1, k), weights.reshape(-1, k), level="token")
    return RoutingDecision(ids, weights, level="row")
