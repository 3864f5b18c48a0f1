"""Which adapter wrote each generated token: the trace of a per-token gate during real generation.

A token-level router decides every position in the same causal pass: the prompt's positions
in the prefill, then one position per decode step. The token written at step ``i`` comes from
the logits of the position before it, so its adapters are those decided for that position:
the last prompt position for the first token, and decode step ``i - 1``'s position after that.
:func:`trace_generation` records the decisions through :class:`moa.eval.slots.DecisionRecorder`
and pairs them with the tokens; :func:`segments` groups the tokens into runs of one top
adapter, which is how ``moa demo`` shows an answer switching adapters mid-way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from moa.data.chat import chat_prompt, end_of_turn
from moa.errors import RoutingError
from moa.eval.slots import DecisionRecorder
from moa.routing.router import Router


@dataclasses.dataclass(frozen=True)
class TracedToken:
    """One generated token and the routing that wrote it.

    Attributes:
        text: The token, decoded.
        adapter: The adapter with the largest weight (``None``: no adapter, the base).
        weights: ``{adapter: weight}`` of the position that predicted the token.
    """

    text: str
    adapter: str | None
    weights: dict[str, float]


def trace_generation(model: Any, prompt: str, router: Router, max_new_tokens: int) -> list[TracedToken]:
    """Greedy answer to ``prompt`` with ``router`` deciding every token, and who wrote each token.

    Args:
        model: A :class:`moa.MixtureModel` holding the router's adapters.
        prompt: The user message (the base's chat template is applied).
        router: A ``level="token"`` router.
        max_new_tokens: Generation budget.

    Returns:
        The generated tokens (the end-of-turn token excluded), each with its routing.

    Raises:
        RoutingError: ``router`` is not token-level.
    """
    if router.level != "token":
        raise RoutingError(f"trace_generation needs a token-level router; {router.name!r} is "
                           f"{router.level!r}-level. Use a LearnedGate(level='token').")
    tokenizer = model.tokenizer
    ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
    recorder = DecisionRecorder(router)
    with torch.no_grad():
        out = model.generate(ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                             adapter_names=["auto"], router=recorder, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    names = list(model.adapter_names)
    ends = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer))}
    traced = []
    for i, token in enumerate(new):
        if token in ends or i >= len(recorder.calls):
            break
        (_rows, width), decision = recorder.calls[i]
        position = width - 1 if i == 0 else 0  # the prefill's last position, then each step's only one
        weights = {names[int(a)]: float(w) for a, w in zip(decision.ids[position], decision.weights[position],
                                                          strict=True) if int(a) >= 0 and float(w) > 0}
        top = max(weights, key=weights.get) if weights else None
        traced.append(TracedToken(tokenizer.decode([token]), top, weights))
    return traced


def segments(traced: list[TracedToken]) -> list[tuple[str, str | None]]:
    """``[(text, adapter), ...]``: consecutive tokens with the same top adapter, joined."""
    out: list[tuple[str, str | None]] = []
    for token in traced:
        if out and out[-1][1] == token.adapter:
            out[-1] = (out[-1][0] + token.text, token.adapter)
        else:
            out.append((token.text, token.adapter))
    return out
