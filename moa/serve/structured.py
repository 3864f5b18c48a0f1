"""Structured output: ``response_format`` ``json_object`` and ``json_schema``, row by row.

A constrained request's rows each carry a :class:`Guide` (an llguidance matcher over the
base's tokenizer). At every step the row masks the tokens its grammar forbids before it
picks one (``-inf`` logits), then advances its matcher with the token picked; once the
JSON is complete the grammar allows only EOS, so the row ends with ``finish_reason
"stop"``. The mask is per row, computed on the CPU from the matcher's state, so
constrained and free rows share one batch and one forward, and a free row's logits and
tokens are exactly what they are without the constrained ones (the mask touches only its
own row's logits).

llguidance was measured against outlines-core on the default base's tokenizer (49,152
tokens; ``benchmarks/structured_output.py``): per step and row, llguidance's mask and advance
take 0.02-0.13 ms on average (p90 under 0.2 ms), outlines-core's 0.25-0.3 ms (p90 0.7 ms);
per request, llguidance compiles a schema in about half a millisecond, outlines-core builds a
regex index in 85-160 ms for small schemas, and cannot express ``json_object``'s recursive
JSON at all. In the engine a constrained row adds about 0.24 ms to a 140 ms decode step of 8
rows (the whole row's mask: the grammar's bitmask, unpacked, applied to the logits).

JSON is generated compact by default (no whitespace between tokens: ``whitespace_flexible``
off), so a small model cannot loop on whitespace; a schema can change llguidance's JSON
options through its ``"x-guidance"`` key (e.g. ``{"whitespace_flexible": true}``).

Example::

    outputs = StructuredOutput(model.tokenizer, model.config.vocab_size, eos_ids)
    grammar = outputs.grammar({"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    guide = outputs.guide(grammar)          # one per row
    logits = guide.mask(logits); guide.advance(token)
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from moa.serve.requests import BadRequestError

#: llguidance's JSON options moa applies before the schema's own ``x-guidance`` ones.
JSON_DEFAULTS = {"whitespace_flexible": False}
#: ``response_format`` types and what each means.
RESPONSE_FORMATS = {
    "text": "free text (the default)",
    "json_object": "any JSON object",
    "json_schema": "JSON that validates against json_schema.schema",
}


class StructuredOutputError(BadRequestError):
    """A ``response_format`` that cannot be served (bad schema, missing package)."""

    def __init__(self, message: str):
        super().__init__(message, "response_format")


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf
        import llguidance.numpy
    except ImportError as error:
        raise StructuredOutputError(
            "response_format needs the llguidance package, which is not installed here. Install moa's serving "
            "extra (pip install 'moa[serve]') and restart the server."
        ) from error
    return llguidance


class StructuredOutput:
    """Grammars for one served base: compiles ``response_format`` and makes each row's :class:`Guide`.

    The llguidance tokenizer (about half a second for a 49k vocabulary) is built on first use
    and kept.

    Args:
        tokenizer: The base's (fast) tokenizer.
        vocab_size: Width of the base's logits (may exceed the tokenizer's vocabulary).
        eos_ids: Token ids that end a completion.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int]):
        self.tokenizer = tokenizer
        self.vocab_size = int(vocab_size)
        self.eos_ids = sorted(int(e) for e in eos_ids)
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()

    def grammar(self, response_format: Mapping[str, Any] | None) -> str | None:
        """The llguidance grammar of a ``response_format`` (``None`` for free text).

        Raises:
            StructuredOutputError: an unknown type, a ``json_schema`` without a schema, a
                schema llguidance refuses (its message included), or llguidance missing.
        """
        if not response_format or response_format.get("type", "text") == "text":
            return None
        kind = response_format.get("type")
        if kind == "json_object":
            schema: Any = {"type": "object"}
        elif kind == "json_schema":
            spec = response_format.get("json_schema") or {}
            schema = spec.get("schema")
            if not isinstance(schema, Mapping):
                raise StructuredOutputError(
                    "response_format json_schema needs json_schema.schema, a JSON Schema object; e.g. "
                    '{"type": "json_schema", "json_schema": {"name": "person", "schema": {"type": "object", '
                    '"properties": {"name": {"type": "string"}}, "required": ["name"]}}}.')
        else:
            raise StructuredOutputError(
                f"response_format type {kind!r} is not supported. Choices: "
                + "; ".join(f"{name!r} ({meaning})" for name, meaning in RESPONSE_FORMATS.items()) + ".")
        if self.tokenizer is None or not hasattr(self.tokenizer, "backend_tokenizer"):
            raise StructuredOutputError("response_format needs the base's fast (tokenizer.json) tokenizer; this "
                                        "server's base has none.")
        llguidance = _llguidance()
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(dict(schema), defaults=dict(JSON_DEFAULTS))
        except (ValueError, TypeError) as error:
            raise StructuredOutputError(f"response_format's schema is not valid JSON: {error}") from error
        problem = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer())
        if problem:
            raise StructuredOutputError(f"response_format's JSON schema cannot be enforced: {problem}. Fix the "
                                        f"schema (JSON Schema draft 2020-12; see docs/evaluating.md).")
        return grammar

    def guide(self, grammar: str) -> Guide:
        """A fresh :class:`Guide` for one row (matchers keep state: one per row)."""
        llguidance = _llguidance()
        matcher = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise StructuredOutputError(f"response_format cannot be enforced: {matcher.get_error()}")
        return Guide(matcher, self.vocab_size)

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                llguidance = _llguidance()
                self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                                  eos_token=self.eos_ids)
            return self._ll_tokenizer


class Guide:
    """One row's grammar state: which tokens may come next, advanced token by token.

    Args:
        matcher: The row's ``llguidance.LLMatcher``.
        vocab_size: Width of the logits it masks.
    """

    def __init__(self, matcher: Any, vocab_size: int):
        import llguidance.numpy

        self.matcher = matcher
        self.vocab_size = int(vocab_size)
        self._fill = llguidance.numpy.fill_next_token_bitmask
        self._bits = llguidance.numpy.allocate_token_bitmask(1, self.vocab_size)

    def allowed(self) -> torch.Tensor:
        """``[vocab]`` bool: the tokens the grammar allows next."""
        self._fill(self.matcher, self._bits, 0)
        words = self._bits[0] if sys.byteorder == "little" else self._bits[0].byteswap()
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: self.vocab_size]
        return torch.from_numpy(bits.astype(bool))

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with every forbidden token at ``-inf`` (a new tensor)."""
        allowed = self.allowed().to(logits.device)
        if logits.shape[-1] > allowed.shape[0]:
            allowed = torch.cat([allowed, allowed.new_zeros(logits.shape[-1] - allowed.shape[0])])
        return logits.masked_fill(~allowed[: logits.shape[-1]], float("-inf"))

    def advance(self, token: int) -> None:
        """Take ``token`` (picked under :meth:`mask`).

        Raises:
            StructuredOutputError: the grammar refused it (never for a token the mask allowed).
        """
        if not self.matcher.consume_token(int(token)):
            raise StructuredOutputError(f"The structured-output grammar refused token {token}: "
                                        f"{self.matcher.get_error()}")

    @property
    def stopped(self) -> bool:
        """Whether the grammar is complete and allows nothing more."""
        return bool(self.matcher.is_stopped())
