"""Incremental detokenization: a row's text, token by token, without re-decoding the answer.

:class:`IncrementalDetokenizer` turns the tokens a row generates into the text it may stream
now, at a bounded cost per token: it decodes only a small window of tokens, never the whole
answer. It works in three layers, each holding back what may still change:

1. Tokens to text. A fast tokenizer's ``tokenizers.decoders.DecodeStream`` (Rust) decodes the
   last token together with the tokens of the previous chunk (their context), so a decoder
   that strips a leading space (Metaspace, SentencePiece-style ``Strip``) or byte-level BPE
   gives each chunk exactly as a one-shot decode would. A chunk whose text ends with an
   incomplete UTF-8 character (``"\\ufffd"``) or adds nothing waits for the next token. Slow
   (Python) tokenizers, and fast ones where the stream refuses a token (its ``InvalidPrefix``
   error: a decoder whose text is not stable as it grows), use the same algorithm in Python:
   vLLM's prefix/read offsets, :class:`_WindowDecoder`.
2. ``clean_up_tokenization_spaces``: where the tokenizer's one-shot decode applies it, the text
   is cleaned in pieces cut where no clean-up rule can reach across the cut (see
   :func:`_safe_split`), so the pieces' clean-up is the whole text's.
3. Stop strings: text that could be the start of a stop string is held back, and nothing past
   the first complete stop string is ever released (the caller cuts there).

The text streamed, ``"".join(push(t) for t in ids) + finish()``, is :attr:`text` by
definition. It equals ``tokenizer.decode(ids, skip_special_tokens=...)`` for every decoder
whose one-shot text of a longer sequence extends that of a shorter one once the last
character is complete (byte-level BPE, Metaspace, WordPiece, SentencePiece), invalid UTF-8
included. Where it does not, the text differs from a one-shot decode, never from itself: with
``ByteFallback``, a run of byte tokens that is not valid UTF-8 as a whole turns *every* byte of
the run into ``"\\ufffd"`` in a one-shot decode, characters completed earlier included; here
text already released stays as it was and only the invalid bytes after it become
``"\\ufffd"``. A run of more than :data:`FORCE_AFTER` tokens that never completes a character
(random bytes) is released once its characters can no longer change, so nothing is held back
for long.

Example::

    detok = IncrementalDetokenizer(model.tokenizer, stops=["\\n\\n"])
    for token in generated:
        send(detok.push(token))        # may be "" (held back)
    send(detok.finish())               # the rest
    assert sent == detok.text
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

logger = logging.getLogger(__name__)

#: What a decoder puts for bytes that are not (yet) a whole UTF-8 character.
REPLACEMENT = "\ufffd"
#: Tokens pending without releasing text before the window decoder tries to release part.
FORCE_AFTER = 8
#: Tokens kept pending by such a forced release: a character begun before the cut needs at
#: most 3 more bytes, and every byte token brings one.
KEEP_PENDING = 3
#: Tokens pending after which a forced release happens even if the text before the cut may
#: still change (a decoder that never settles): the bound on the work per token.
HARD_CAP = 32
#: Characters that may end a piece of text reached by a clean-up rule that continues after it:
#: the last characters of the rules' proper prefixes (" ", " '", " n", " n'", " 'v", " 'r").
_CLEANUP_OPEN_ENDS = frozenset(" 'nvr")

Decode = Callable[[list[int]], str]


class IncrementalDetokenizer:
    """The text of a generated answer, released token by token once it can no longer change.

    Args:
        tokenizer: A ``transformers`` tokenizer (fast: its ``backend_tokenizer`` decodes; slow:
            its ``decode``), or ``None`` (then the text is always ``""``).
        skip_special_tokens: Leave special tokens out of the text, as ``decode`` does.
        stops: Stop strings: text that may start one is held back, and nothing past the first
            complete one is released by :meth:`push` (the caller cuts there).
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True, stops: Sequence[str] = ()) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._decoder: _StreamDecoder | _WindowDecoder | None = None
        self._cleanup: Callable[[str], str] | None = None
        if tokenizer is not None:
            self._decoder = _token_decoder(tokenizer, skip_special_tokens)
            if _cleans_up(tokenizer):
                self._cleanup = tokenizer.clean_up_tokenization
        self._released = ""  # text handed out
        self._held = ""  # final text not handed out yet (a possible stop string's start)
        self._stopped = False  # _held starts with a complete stop string
        self._raw = ""  # decoded text not cleaned up yet (a clean-up rule may reach past it)
        self._tail: str | None = None  # cache of the pending tokens' text, see text
        self._finished = False

    def push(self, token_id: int) -> str:
        """Add one generated token.

        Args:
            token_id: The token (the caller leaves EOS out).

        Returns:
            The text that is now final and safe to stream (may be ``""``).

        Raises:
            RuntimeError: After :meth:`finish`.
        """
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.push after finish()")
        if self._decoder is None:
            return ""
        self._tail = None
        self._add_raw(self._decoder.step(int(token_id)))
        return self._release()

    @property
    def text(self) -> str:
        """All the text so far: what is released, what is held back, and what the pending tokens
        give if the answer ends now (an incomplete character as ``"\\ufffd"``). Equal to
        ``tokenizer.decode`` of the tokens pushed for concatenative decoders (module docstring).
        Building it copies the text (cheap next to a decode); no token is decoded again."""
        if self._finished or self._decoder is None:
            return self._released + self._held
        if self._tail is None:
            self._tail = self._decoder.tail()
        rest = self._raw + self._tail
        if self._cleanup is not None:
            rest = self._cleanup(rest)
        return self._released + self._held + rest

    def finish(self) -> str:
        """End of generation: release whatever was held back.

        Returns:
            The rest of the text (:attr:`text` minus what :meth:`push` released).
        """
        if self._finished:
            return ""
        if self._decoder is not None:
            rest = self._raw + self._decoder.tail()
            self._held += self._cleanup(rest) if self._cleanup is not None else rest
            self._raw = ""
        self._finished = True
        rest, self._held = self._held, ""
        self._released += rest
        return rest

    def _add_raw(self, raw: str) -> None:
        """Take decoded text: final at once, or once clean-up can no longer change it."""
        if not raw:
            return
        if self._cleanup is None:
            self._held += raw
            return
        self._raw += raw
        cut = _safe_split(self._raw)
        if cut:
            self._held += self._cleanup(self._raw[:cut])
            self._raw = self._raw[cut:]

    def _release(self) -> str:
        """Hand out the final text up to any possible start of a stop string."""
        if self._stopped or not self._held:
            return ""
        held = self._held
        starts = [at for at in (held.find(stop) for stop in self._stops) if at >= 0]
        if starts:
            safe, self._stopped = min(starts), True
        else:
            safe = len(held) - _partial_stop(held, self._stops)
        released, self._held = held[:safe], held[safe:]
        self._released += released
        return released


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that is a proper start of a stop string."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    return hold


def _safe_split(raw: str) -> int:
    """Where ``raw`` may be cut so that cleaning up the two parts apart equals cleaning up the whole.

    ``transformers``' clean-up is a chain of ``str.replace`` of patterns that start with a space
    and delete spaces only. A match crossing the cut needs the left part to end with a proper
    prefix of a pattern; after a character outside :data:`_CLEANUP_OPEN_ENDS` there is none, and
    that character, not a space, stays last whatever the earlier rules delete. So the left part's
    matches, and the right part's, are the same apart as together.

    Returns:
        The index after the last such character (0: no safe cut yet).
    """
    for index in range(len(raw) - 1, -1, -1):
        if raw[index] not in _CLEANUP_OPEN_ENDS:
            return index + 1
    return 0


def _cleans_up(tokenizer: Any) -> bool:
    """Whether the tokenizer's ``decode`` applies ``clean_up_tokenization`` by default.

    ``transformers`` (5.x) skips it for fast tokenizers with a BPE model unless told otherwise
    (``TokenizersBackend._decode``), because it corrupts BPE text.
    """
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    backend = _backend(tokenizer)
    if backend is not None and type(backend.model).__name__ == "BPE":
        return bool(getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                            False))
    return True


def _backend(tokenizer: Any) -> Tokenizer | None:
    """A fast tokenizer's ``tokenizers.Tokenizer``; ``None`` for a slow one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None


def _token_decoder(tokenizer: Any, skip_special_tokens: bool) -> _StreamDecoder | _WindowDecoder:
    """The first layer for ``tokenizer``: the Rust stream for a fast one, the window otherwise."""
    backend = _backend(tokenizer)
    if backend is not None:
        def decode(ids: list[int]) -> str:
            return backend.decode(ids, skip_special_tokens=skip_special_tokens)

        return _StreamDecoder(backend, decode, skip_special_tokens)

    def decode_slow(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    return _WindowDecoder(decode_slow)


def _new_text(decode: Decode, context: list[int], pending: list[int], prefix: str) -> str:
    """The text ``pending`` adds after ``context`` (whose own text is ``prefix``).

    Where the context's text changes once the pending tokens follow it (a decoder that is not
    stable as it grows), released text cannot change, so the pending tokens are decoded alone.
    """
    text = decode(context + pending)
    if text.startswith(prefix):
        return text[len(prefix):]
    return decode(pending)


class _WindowDecoder:
    """vLLM's incremental detokenization: decode the pending tokens after their context.

    The context is the tokens of the last chunk released (their text is ``prefix``), the pending
    tokens those not released yet. Each step decodes ``context + pending`` (a few tokens) and
    releases what the pending tokens add, unless it is empty or ends with an incomplete
    character; then the pending tokens become the context.

    Args:
        decode: Decodes a list of token ids (special tokens skipped or not, no clean-up).
        context: Tokens already released, whose text the next ones follow.
        pending: Tokens not released yet.
    """

    def __init__(self, decode: Decode, context: Sequence[int] = (), pending: Sequence[int] = ()) -> None:
        self._decode = decode
        self._context = list(context)
        self._pending = list(pending)
        self._prefix = decode(self._context) if self._context else ""

    def step(self, token: int) -> str:
        """Add a token; return the text released (may be ``""``)."""
        self._pending.append(token)
        return self.settle()

    def settle(self) -> str:
        """Release what the pending tokens give, if it can no longer change."""
        if not self._pending:
            return ""
        new = _new_text(self._decode, self._context, self._pending, self._prefix)
        if new and not new.endswith(REPLACEMENT):
            self._advance(len(self._pending))
            return new
        if len(self._pending) >= FORCE_AFTER:
            return self._force(new)
        return ""

    def tail(self) -> str:
        """What the pending tokens give if the answer ends now."""
        return _new_text(self._decode, self._context, self._pending, self._prefix) if self._pending else ""

    def _force(self, new: str) -> str:
        """Release all but the last :data:`KEEP_PENDING` pending tokens' text, once it is final.

        It is final when the text with the kept tokens after it begins with it: those tokens
        hold enough bytes to complete any character begun before the cut.
        """
        cut = len(self._pending) - KEEP_PENDING
        head = _new_text(self._decode, self._context, self._pending[:cut], self._prefix)
        if not new.startswith(head):
            if len(self._pending) < HARD_CAP:
                return ""
            logger.debug("Releasing %d tokens whose text has not settled (%r)", cut, head)
        self._advance(cut)
        return head

    def _advance(self, count: int) -> None:
        self._context, self._pending = self._pending[:count], self._pending[count:]
        self._prefix = self._decode(self._context)


class _StreamDecoder:
    """The first layer for a fast tokenizer: its ``DecodeStream``, and the window where it fails.

    The stream keeps the same context as :class:`_WindowDecoder` (the tokens of the last chunk
    it returned); they are mirrored here so that the window can take over exactly where the
    stream stopped: when it raises (``InvalidPrefix``: the context's text changed), or when
    :data:`FORCE_AFTER` tokens gave no text (the stream would decode an ever longer window).

    Args:
        backend: The tokenizer's ``tokenizers.Tokenizer``.
        decode: ``backend.decode`` with the special tokens option bound.
        skip_special_tokens: Passed to the stream.
    """

    def __init__(self, backend: Tokenizer, decode: Decode, skip_special_tokens: bool) -> None:
        self._backend = backend
        self._decode = decode
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._context: list[int] = []
        self._pending: list[int] = []
        self._window: _WindowDecoder | None = None  # set once the stream is given up

    def step(self, token: int) -> str:
        """Add a token; return the text released (may be ``""``)."""
        if self._window is not None:
            return self._window.step(token)
        try:
            chunk = self._stream.step(self._backend, token)
        except Exception as error:  # noqa: BLE001 - the stream's InvalidPrefix comes as a plain Exception
            logger.debug("DecodeStream refused token %d (%s); decoding by windows from here", token, error)
            self._pending.append(token)
            return self._hand_over()
        if chunk is None:
            self._pending.append(token)
            return self._hand_over() if len(self._pending) >= FORCE_AFTER else ""
        self._context, self._pending = [*self._pending, token], []
        return chunk

    def tail(self) -> str:
        """What the pending tokens give if the answer ends now."""
        if self._window is not None:
            return self._window.tail()
        if not self._pending:
            return ""
        return _new_text(self._decode, self._context, self._pending, self._decode(self._context))

    def _hand_over(self) -> str:
        self._window = _WindowDecoder(self._decode, self._context, self._pending)
        return self._window.settle()
