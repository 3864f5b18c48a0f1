"""Exact-match scoring by one teacher-forced forward per item, and the oracle switch.

Greedy decoding writes the gold answer if and only if, at every answer position of a
forward over prompt + gold answer, the argmax of the logits is the gold token (and then
the end-of-turn token). One forward per item replaces one forward per generated token,
which makes sweeps over many routing configurations affordable on a CPU. The final
tables still use real generation (:mod:`moa.eval.slots`).

Routing is given per batch by a :data:`RoutingPlan`: a function from the batch to the
extra keyword arguments of ``model(...)``. :func:`explicit_rows`, :func:`routed_rows`
and :func:`oracle_switch` cover the configurations the slot evaluation compares.

Segment ownership: an example whose ``meta["segments"]`` is ``[[text, domain], ...]``
gives every answer token the domain of the segment holding its first character. The
oracle switch uses, at each position, the adapter owning the *next* token (the one that
position predicts); prompt positions use the first segment's adapter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from moa.data.chat import chat_prompt, end_of_turn, ensure_pad_token, pad_batch
from moa.errors import RoutingError, format_choices
from moa.model.adapter_bank import BASE_ROW
from moa.routing.decision import RoutingDecision


@dataclasses.dataclass(frozen=True)
class ForcedItem:
    """One example encoded for teacher forcing.

    Attributes:
        input_ids: Prompt + answer + end-of-turn token ids.
        labels: ``-100`` on the prompt, the token ids on the answer.
        owners: Per answer token (and the end token), the domain of its segment
            (``None`` when the example has no segments).
    """

    input_ids: list[int]
    labels: list[int]
    owners: list[str | None]

    @property
    def prompt_length(self) -> int:
        return len(self.input_ids) - len(self.owners)


@dataclasses.dataclass
class ForcedBatch:
    """A right-padded batch of :class:`ForcedItem` and the examples they came from."""

    examples: list[Any]
    items: list[ForcedItem]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


RoutingPlan = Callable[[Any, ForcedBatch], dict[str, Any]]
"""``plan(model, batch) -> extra keyword arguments of model(...)`` for that batch."""


def token_owners(tokenizer: Any, answer: str, segments: Sequence[Sequence[str]] | None) -> list[str | None]:
    """The owning domain of each token of ``answer + end-of-turn`` (the end token: the last segment's)."""
    encoded = tokenizer(answer + end_of_turn(tokenizer), add_special_tokens=False, return_offsets_mapping=True)
    if not segments:
        return [None] * len(encoded["input_ids"])
    bounds, start = [], 0
    for text, owner in segments:
        bounds.append((start, start + len(text), owner))
        start += len(text)
    owners: list[str | None] = []
    for first, _last in encoded["offset_mapping"]:
        owner = next((o for lo, hi, o in bounds if lo <= first < hi), bounds[-1][2])
        owners.append(owner)
    return owners


def encode_forced(tokenizer: Any, example: Any) -> ForcedItem:
    """Encode one example (prompt and answer tokenized apart, as generation sees them)."""
    prompt_ids = tokenizer(chat_prompt(tokenizer, example.prompt), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example.answer + end_of_turn(tokenizer), add_special_tokens=False)["input_ids"]
    owners = token_owners(tokenizer, example.answer, example.meta.get("segments"))
    return ForcedItem(list(prompt_ids) + list(answer_ids), [-100] * len(prompt_ids) + list(answer_ids), owners)


def make_batch(tokenizer: Any, examples: Sequence[Any]) -> ForcedBatch:
    """Encode and right-pad ``examples``."""
    ensure_pad_token(tokenizer)
    items = [encode_forced(tokenizer, e) for e in examples]
    padded = pad_batch([i.input_ids for i in items], tokenizer.pad_token_id, labels=[i.labels for i in items])
    return ForcedBatch(list(examples), items, padded["input_ids"], padded["attention_mask"], padded["labels"])


def correct_positions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: all answer tokens argmax-correct; and the per-position correctness ``[B, T-1]``.

    Position ``t`` predicts label ``t + 1``; positions whose next label is ``-100`` count as correct.
    """
    target = labels[:, 1:]
    hit = (logits[:, :-1].argmax(-1) == target) | (target == -100)
    return hit.all(-1), hit


def forced_logits(model: Any, examples: Sequence[Any], plan: RoutingPlan) -> tuple[ForcedBatch, torch.Tensor]:
    """One no-cache, no-gradient forward over ``examples`` (prompt + answer) under ``plan``: float32 CPU logits."""
    batch = make_batch(model.tokenizer, examples)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids.to(model.device), attention_mask=batch.attention_mask.to(model.device),
                       use_cache=False, **plan(model, batch)).logits
    return batch, logits.float().cpu()


def teacher_forced_exact(model: Any, examples: Sequence[Any], plan: RoutingPlan, **options: Any) -> list[bool]:
    """Whether greedy decoding under ``plan`` would write each example's gold answer exactly.

    ``options`` are those of :func:`teacher_forced_scores`. Returns one bool per example.
    """
    return teacher_forced_scores(model, examples, plan, **options)[0]


def teacher_forced_scores(
    model: Any,
    examples: Sequence[Any],
    plan: RoutingPlan,
    batch_size: int = 16,
    progress: bool = False,
    desc: str = "teacher-forced",
) -> tuple[list[bool], list[float]]:
    """Teacher-forced exact match and each example's share of argmax-correct answer tokens.

    Args:
        model: A :class:`moa.MixtureModel`.
        examples: Items with ``prompt``, ``answer`` and ``meta``.
        plan: The routing of each batch (see :data:`RoutingPlan`).
        batch_size: Items per forward.
        progress: Show a tqdm bar.
        desc: The bar's label.

    Returns:
        ``(exact, shares)``: one bool and one fraction per example, in order.
    """
    out: list[bool] = []
    shares: list[float] = []
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress):
        batch, logits = forced_logits(model, examples[start:start + batch_size], plan)
        rows, hit = correct_positions(logits, batch.labels)
        out.extend(bool(r) for r in rows)
        answer = batch.labels[:, 1:] != -100
        shares.extend(((hit & answer).sum(-1) / answer.sum(-1).clamp(min=1)).tolist())
    return out, shares


def teacher_forced_loss(model: Any, examples: Sequence[Any], plan: RoutingPlan, batch_size: int = 16) -> float:
    """Mean cross-entropy of the answer tokens (end token included) under ``plan``, no gradient.

    The objective a gradient-free search over mixture weights minimises (LoraHub, arXiv 2307.13269).
    """
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch, logits = forced_logits(model, examples[start:start + batch_size], plan)
        labels = batch.labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((labels != -100).sum())
    return total / max(1, count)


# -- routing plans -----------------------------------------------------------------------------


def explicit_rows(route: str | Mapping[str, float] | None) -> RoutingPlan:
    """Every row uses ``route``: an adapter name, a ``{name: weight}`` mixture, or ``None`` (base)."""
    if isinstance(route, Mapping):
        return lambda model, batch: {"adapter_weights": [dict(route)] * len(batch.items)}
    return lambda model, batch: {"adapter_names": [route] * len(batch.items)}


def routed_rows(router: Any) -> RoutingPlan:
    """Every row is ``"auto"``, decided by ``router`` for this call."""
    return lambda model, batch: {"adapter_names": ["auto"] * len(batch.items), "router": router}


def position_owners(item: ForcedItem, width: int) -> list[str | None]:
    """The domain each of ``width`` positions should run: the owner of the token it predicts."""
    first = item.owners[0] if item.owners else None
    owners = [first] * width
    start = item.prompt_length - 1  # this position predicts the first answer token
    for i, owner in enumerate(item.owners):
        owners[start + i] = owner
    return owners


def oracle_switch() -> RoutingPlan:
    """Per token, the adapter owning the token being predicted (the known hand-over rule).

    A segment owned by ``"__base__"`` (PEFT's name for no adapter) runs the bare base.
    """

    def plan(model: Any, batch: ForcedBatch) -> dict[str, Any]:
        names = list(model.adapter_names)
        width = batch.input_ids.shape[1]
        ids = torch.full((len(batch.items), width), -1, dtype=torch.int32)
        for row, item in enumerate(batch.items):
            for pos, owner in enumerate(position_owners(item, width)):
                if owner is not None and owner != BASE_ROW:
                    if owner not in names:
                        raise RoutingError(f"Segment owner {owner!r} is not a loaded adapter. "
                                           f"Loaded: {format_choices(names)}.")
                    ids[row, pos] = names.index(owner)
        flat = ids.reshape(-1, 1)
        decision = RoutingDecision(ids=flat, weights=(flat >= 0).float(), level="token")
        return {"routing_decision": decision}

    return plan
