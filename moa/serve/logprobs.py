"""Log-probabilities of a row's tokens, and the shapes OpenAI's API gives them.

A row's log-probabilities come from the very logits it picks its token from: the logits of
that row alone, computed under its own routing (a named adapter, a weighted mixture, or the
router's decision for ``auto``), in float32, before anything changes them for sampling
(temperature, ``top_p``, ``min_tokens``, a structured-output mask). That is vLLM's default
(``raw_logprobs``) and what offline scoring computes: ``torch.log_softmax(logits, -1)``.

Prompt log-probabilities (``echo`` with ``logprobs`` on ``/v1/completions``) come from the
prefill's logits at every prompt position: position ``i`` scores prompt token ``i + 1``, and
the first prompt token has none (``None``), as in OpenAI's legacy API.

Example::

    entry = step_logprob(logits, token, k=5)          # in the engine, per row and step
    tokens = TokenText(model.tokenizer)
    body = completion_logprobs([entry], tokens)       # {"tokens", "token_logprobs", ...}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from moa.serve.requests import TokenLogprob


def step_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The log-probability of ``token`` and the ``k`` most likely tokens under ``logits``.

    Args:
        logits: ``[vocab]`` raw logits of one row at one step.
        token: The token picked (or the prompt's next token).
        k: Alternatives to report (0: only ``token``).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return TokenLogprob(int(token), float(logprobs[token]), _top(logprobs, k))


def prompt_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int], k: int) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it.

    Args:
        logits: ``[len(prompt_ids) - 1, vocab]``: the logits at every prompt position but
            the last (position ``i`` predicts token ``i + 1``).
        prompt_ids: The prompt's tokens.
        k: Alternatives to report per position.

    Returns:
        ``[None, entry for token 1, ..., entry for the last token]``.
    """
    targets = torch.tensor(list(prompt_ids[1:]), dtype=torch.long, device=logits.device)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, targets[:, None])[:, 0].tolist()
    entries: list[TokenLogprob | None] = [None]
    if k:
        values, ids = torch.topk(logprobs, k, dim=-1)
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        tops = [()] * len(chosen)
    entries.extend(TokenLogprob(int(t), float(lp), top)
                   for t, lp, top in zip(prompt_ids[1:], chosen, tops, strict=True))
    return entries


def _top(logprobs: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    if not k:
        return ()
    values, ids = torch.topk(logprobs, k)
    return tuple(zip(ids.tolist(), values.tolist(), strict=True))


class TokenText:
    """How the API shows a token: its text and its bytes (cached per token id).

    A byte-level BPE tokenizer's token is a run of bytes that may end inside a UTF-8
    character; its ``bytes`` are then the exact bytes (from the byte-level alphabet), and its
    text shows the incomplete character as U+FFFD, as decoding it alone does.

    Args:
        tokenizer: The base's tokenizer (``None``: tokens are shown as ``token_id:<id>``).
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._byte_level = _byte_decoder(tokenizer)
        self._cache: dict[int, tuple[str, bytes]] = {}

    def text(self, token_id: int, as_id: bool = False) -> str:
        """The token's text (``token_id:<id>`` with ``as_id``, vLLM's ``return_tokens_as_token_ids``)."""
        if as_id or self.tokenizer is None:
            return f"token_id:{token_id}"
        return self._lookup(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        """The token's bytes, as a list of integers (OpenAI's chat ``bytes``)."""
        if self.tokenizer is None:
            return list(f"token_id:{token_id}".encode())
        return list(self._lookup(token_id)[1])

    def _lookup(self, token_id: int) -> tuple[str, bytes]:
        found = self._cache.get(token_id)
        if found is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            raw = None
            if self._byte_level is not None and token_id not in self._special_ids():
                piece = self.tokenizer.convert_ids_to_tokens(token_id)
                if isinstance(piece, str) and all(ch in self._byte_level for ch in piece):
                    raw = bytes(self._byte_level[ch] for ch in piece)
            found = (text, raw if raw is not None else text.encode("utf-8"))
            self._cache[token_id] = found
        return found

    def _special_ids(self) -> set[int]:
        return set(getattr(self.tokenizer, "all_special_ids", ()) or ())


def byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte -> the byte."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(visible)
    extra = 0
    for byte in range(256):
        if byte not in visible:
            visible.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(visible, chars, strict=True)}


def _byte_decoder(tokenizer: Any) -> dict[str, int] | None:
    """:func:`byte_alphabet` when ``tokenizer`` decodes byte-level (GPT-2 style BPE), else ``None``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None or type(decoder).__name__ != "ByteLevel":
        return None
    return byte_alphabet()


def completion_logprobs(
    entries: Sequence[TokenLogprob | None], tokens: TokenText, *, as_ids: bool = False, offset: int = 0,
    first_token: int | None = None,
) -> dict[str, list[Any]]:
    """``/v1/completions``' ``logprobs``: ``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``.

    Each ``top_logprobs`` entry maps token text to log-probability for the ``k`` most likely
    tokens and the chosen one (so up to ``k + 1`` keys, as OpenAI's legacy API). A prompt's
    first token (an entry ``None``) has ``None`` for both.

    Args:
        entries: The positions to show, in order.
        tokens: Token texts.
        as_ids: Show tokens as ``token_id:<id>``.
        offset: The first token's character offset in the answer's text.
        first_token: The token of a ``None`` entry (the prompt's first token).
    """
    body: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for entry in entries:
        if entry is None:  # the prompt's first token: nothing precedes it
            text = tokens.text(first_token, as_ids) if first_token is not None else ""
            logprob, top = None, None
        else:
            text = tokens.text(entry.token_id, as_ids)
            logprob, top = entry.logprob, {}
            for token_id, value in (*entry.top, (entry.token_id, entry.logprob)):
                top.setdefault(tokens.text(token_id, as_ids), value)
        body["tokens"].append(text)
        body["token_logprobs"].append(logprob)
        body["top_logprobs"].append(top)
        body["text_offset"].append(offset)
        offset += len(text)
    return body


def chat_logprobs(entries: Sequence[TokenLogprob], tokens: TokenText, *, as_ids: bool = False) -> dict[str, Any]:
    """``/v1/chat/completions``' ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": tokens.text(token_id, as_ids), "logprob": logprob, "bytes": tokens.bytes(token_id)}

    content = []
    for entry in entries:
        shown = item(entry.token_id, entry.logprob)
        shown["top_logprobs"] = [item(t, lp) for t, lp in entry.top]
        content.append(shown)
    return {"content": content, "refusal": None}
