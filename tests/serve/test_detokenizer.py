"""Tests of moa.serve.detokenizer: streamed text == final text, held back only while it may change.

The reference is always an independent one: ``tokenizer.decode`` of the whole sequence. The
tokenizers are real ones built in memory (``tokenizers`` models and decoders wrapped in a
``transformers`` fast tokenizer, ``transformers``' slow ByT5 tokenizer) plus the default base's
tokenizer when it is on this machine. Several of them decode a growing sequence to text that is
not a prefix of the final text (split UTF-8 characters, ByteFallback, clean-up of spaces); the
tests check that this is so before relying on it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moa.serve import detokenizer
from moa.serve.detokenizer import FORCE_AFTER, HARD_CAP, IncrementalDetokenizer
from moa.testing.fixtures import make_tiny_tokenizer

#: Derandomized, so CI runs the same examples every time; no deadline (tokenizers warm up).
CHECKS = settings(max_examples=150, deadline=None, derandomize=True)


def stream(tokenizer: Any, ids: Sequence[int], **options: Any) -> tuple[list[str], str, IncrementalDetokenizer]:
    """Push ``ids`` one by one; the chunks released, then what ``finish`` released, and the detokenizer."""
    detok = IncrementalDetokenizer(tokenizer, **options)
    chunks = [detok.push(token) for token in ids]
    return chunks, detok.finish(), detok


def streamed_text(tokenizer: Any, ids: Sequence[int], **options: Any) -> str:
    """The streamed text, checked against the detokenizer's own final text and the text it gave
    just before ``finish`` (the same: finish only releases)."""
    detok = IncrementalDetokenizer(tokenizer, **options)
    text = "".join(detok.push(token) for token in ids)
    before = detok.text
    text += detok.finish()
    assert text == detok.text == before
    return text


# -- tokenizers -----------------------------------------------------------------------------


@functools.cache
def tiny() -> Any:
    """Byte-level BPE, ids 0-255 are bytes, ``<eos>`` 256 and ``<pad>`` 257 (special)."""
    return make_tiny_tokenizer()


@functools.cache
def sentencepiece_like() -> Any:
    """A Llama-2-style tokenizer: ``▁`` for spaces, byte fallback, the first space stripped."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = (["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
              + ["▁", "▁▁", "▁the", "▁H", "ello", "▁world", "é", "ö", "a", "b", ".", "'", "s", "▁a", "n't"])
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@functools.cache
def metaspace() -> Any:
    """A Unigram model with a Metaspace pre-tokenizer and decoder (``prepend_scheme="always"``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", "▁", "▁▁", "a", "▁a", "b", "▁b", "é", "▁é", ".", "▁."]
    tokenizer = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=0))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


#: WordPiece vocabulary rich in what ``clean_up_tokenization`` rewrites (" .", " ' ", " n't"...).
WORDPIECE_VOCAB = ["[UNK]", "[CLS]", "[SEP]", "do", "n", "'", "t", "s", "m", "ve", "re", ".", ",", "?", "!", "##n",
                   "##'", "##t", "##s", "it", "we", "v", "r", "x"]


@functools.cache
def wordpiece() -> Any:
    """A WordPiece (BERT-style) tokenizer whose ``decode`` cleans up tokenization spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece({p: i for i, p in enumerate(WORDPIECE_VOCAB)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", clean_up_tokenization_spaces=True)


@functools.cache
def byt5() -> Any:
    """``transformers``' slow (Python) ByT5 tokenizer: bytes, incomplete UTF-8 dropped."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


@functools.cache
def default_base_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from moa.model.default_base import default_base_dir, is_complete_base_dir

    path = default_base_dir()
    if not is_complete_base_dir(path):
        pytest.skip(f"the default base is not converted at {path} (run `moa base-path`)")
    return AutoTokenizer.from_pretrained(path)


@functools.cache
def byte_id_table() -> dict[int, int]:
    """Byte -> id of the tiny byte-level tokenizer (ids follow the byte-level alphabet's order)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {byte: tiny().convert_tokens_to_ids(char) for byte, char in bytes_to_unicode().items()}


def byte_ids(data: bytes | str) -> list[int]:
    """The tiny tokenizer's ids of ``data``'s bytes, one token per byte."""
    table = byte_id_table()
    return [table[byte] for byte in (data.encode() if isinstance(data, str) else data)]


def ids_of(tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    return list(tokenizer.convert_tokens_to_ids(list(tokens)))


def unstable_growth(tokenizer: Any, ids: Sequence[int]) -> bool:
    """Whether some shorter sequence decodes to text that is not a prefix of the whole one's."""
    final = tokenizer.decode(ids, skip_special_tokens=True)
    return any(not final.startswith(tokenizer.decode(ids[:k], skip_special_tokens=True)) for k in range(len(ids)))


# -- byte-level BPE -------------------------------------------------------------------------


@CHECKS
@given(st.lists(st.integers(0, 257), max_size=40))
def test_random_bytes_stream_the_one_shot_decode(ids: list[int]) -> None:
    """Random bytes (split and invalid UTF-8, special tokens): streamed == text == decode, and
    at every step the text is the decode of the tokens so far."""
    tokenizer = tiny()
    detok = IncrementalDetokenizer(tokenizer)
    released = ""
    for k, token in enumerate(ids, 1):
        released += detok.push(token)
        assert detok.text == tokenizer.decode(ids[:k], skip_special_tokens=True)
        assert detok.text.startswith(released)
    released += detok.finish()
    assert released == detok.text == tokenizer.decode(ids, skip_special_tokens=True)


@CHECKS
@given(st.lists(st.sampled_from(["a", " ", "é", "€", "😀", "\n", "ok"]), max_size=20))
def test_utf8_text_cut_into_bytes(parts: list[str]) -> None:
    """Characters of 1 to 4 bytes, one byte per token: each is released once it is complete."""
    text = "".join(parts)
    ids = byte_ids(text)
    chunks, rest, _ = stream(tiny(), ids)
    assert tiny().decode(ids) == text
    assert "".join(chunks) == text and rest == ""
    assert all("\ufffd" not in chunk for chunk in chunks)


def test_incomplete_character_is_held_back() -> None:
    euro = byte_ids("€")  # 3 bytes
    a = byte_ids("a")[0]
    detok = IncrementalDetokenizer(tiny())
    assert detok.push(a) == "a"
    assert detok.push(euro[0]) == ""
    assert detok.text == "a\ufffd"  # what the answer would be if it ended now, as decode gives
    assert detok.push(euro[1]) == ""
    assert detok.push(euro[2]) == "€"
    assert tiny().decode([a, *euro[:2]]) == "a\ufffd"  # the growing decode is not a prefix of "a€"


def test_answer_ending_in_an_incomplete_character() -> None:
    ids = byte_ids("x".encode() + "😀".encode()[:3])
    chunks, rest, detok = stream(tiny(), ids)
    assert "".join(chunks) == "x" and rest == "\ufffd"
    assert detok.text == tiny().decode(ids)


def test_invalid_bytes_are_released_and_never_pile_up() -> None:
    """Continuation bytes that start no character: final at once in a lossy decode, released once
    the next byte shows it (a long run must not wait for a character that cannot come)."""
    ids = byte_ids(b"\x80" * 50 + b"a")
    chunks, rest, detok = stream(tiny(), ids)
    assert detok.text == tiny().decode(ids) == "\ufffd" * 50 + "a"
    assert len("".join(chunks[:FORCE_AFTER + 1])) > 0  # released before the run ends


# -- SentencePiece-like (Strip + ByteFallback), Metaspace -------------------------------------


@st.composite
def sentencepiece_ids(draw: Any) -> list[int]:
    tokenizer = sentencepiece_like()
    words = draw(st.lists(st.sampled_from(["the", "Hello", "world", "é", "€", "😀", "don't", "a", " ", "x"]),
                          max_size=8))
    ids = tokenizer.encode("".join(words), add_special_tokens=False)
    noise = draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=10))
    at = draw(st.integers(0, len(ids)))
    return ids[:at] + noise + ids[at:]


def valid_byte_runs(tokenizer: Any, ids: Sequence[int]) -> bool:
    """Whether every run of ``<0x..>`` byte tokens is valid UTF-8 as a whole."""
    run = b""
    for token in [*tokenizer.convert_ids_to_tokens(list(ids)), "end"]:
        if token.startswith("<0x") and len(token) == 6:
            run += bytes([int(token[3:5], 16)])
            continue
        try:
            run.decode()
        except UnicodeDecodeError:
            return False
        run = b""
    return True


@CHECKS
@given(sentencepiece_ids())
def test_sentencepiece_like_streams_its_own_text(ids: list[int]) -> None:
    """Streamed == text always; == the one-shot decode unless ByteFallback poisons a byte run."""
    tokenizer = sentencepiece_like()
    text = streamed_text(tokenizer, ids)
    if valid_byte_runs(tokenizer, ids):
        assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_sentencepiece_like_growing_decode_is_unstable_and_stream_is_not() -> None:
    """The leading space is stripped only at the start, a character in byte tokens is "\\ufffd"
    per byte until complete: the decodes of growing prefixes are not prefixes of the final text."""
    tokenizer = sentencepiece_like()
    ids = tokenizer.encode("Hello world €é the", add_special_tokens=False)
    assert unstable_growth(tokenizer, ids)
    assert "".join(tokenizer.decode([token]) for token in ids) != tokenizer.decode(ids)  # naive concatenation
    assert streamed_text(tokenizer, ids) == tokenizer.decode(ids) == "Hello world €é the"


def test_byte_fallback_poisoned_run_falls_back_from_the_stream() -> None:
    """ByteFallback turns every byte of an invalid run into "\\ufffd", "€" included once an invalid
    byte follows it: DecodeStream refuses that (its text changed); the window decoder takes over,
    keeps the "€" already released and streams its own text (documented difference)."""
    from tokenizers.decoders import DecodeStream

    tokenizer = sentencepiece_like()
    ids = ids_of(tokenizer, ["<0xE2>", "<0x82>", "<0xAC>", "<0x80>", "a", "▁the"])
    raw = DecodeStream(skip_special_tokens=True)
    with pytest.raises(Exception, match="Invalid prefix"):
        for token in ids:
            raw.step(tokenizer.backend_tokenizer, token)
    chunks, rest, detok = stream(tokenizer, ids)
    assert chunks[:3] == ["", "", "€"]
    assert "".join(chunks) + rest == detok.text == "€\ufffda the"
    assert tokenizer.decode(ids) == "\ufffd" * 4 + "a the"


@CHECKS
@given(st.lists(st.integers(0, 12), max_size=30))
def test_metaspace_random_pieces(ids: list[int]) -> None:
    tokenizer = metaspace()
    assert streamed_text(tokenizer, ids) == tokenizer.decode(ids, skip_special_tokens=True)


def test_metaspace_first_space_is_stripped_once() -> None:
    tokenizer = metaspace()
    ids = ids_of(tokenizer, ["▁a", "▁b", "▁", "b", "<s>", "▁a", "▁é", "."])
    assert "".join(tokenizer.decode([t], skip_special_tokens=True) for t in ids) != tokenizer.decode(
        ids, skip_special_tokens=True)
    assert streamed_text(tokenizer, ids) == tokenizer.decode(ids, skip_special_tokens=True) == "a b b a é."
    assert streamed_text(tokenizer, ids, skip_special_tokens=False) == tokenizer.decode(ids)


# -- clean_up_tokenization_spaces -------------------------------------------------------------


@CHECKS
@given(st.lists(st.integers(0, len(WORDPIECE_VOCAB) - 1), max_size=30))
def test_cleanup_of_tokenization_spaces_matches_decode(ids: list[int]) -> None:
    tokenizer = wordpiece()
    assert streamed_text(tokenizer, ids) == tokenizer.decode(ids, skip_special_tokens=True)
    assert streamed_text(tokenizer, ids, skip_special_tokens=False) == tokenizer.decode(ids)


def test_cleanup_rewrites_released_looking_text() -> None:
    """ "do n '" grows into "don't": the space before "n" must wait for what follows."""
    tokenizer = wordpiece()
    ids = ids_of(tokenizer, ["do", "n", "'", "t", "it", "'", "s", "."])
    assert unstable_growth(tokenizer, ids)
    chunks, rest, detok = stream(tokenizer, ids)
    assert "".join(chunks) + rest == detok.text == tokenizer.decode(ids) == "don't it's."


@CHECKS
@given(st.text(alphabet=" 'nvrtsme.,?!x", max_size=12), st.text(alphabet=" 'nvrtsme.,?!x", max_size=12))
def test_cleanup_cut_rule(left: str, right: str) -> None:
    """Where the detokenizer cuts text before cleaning it up, the parts clean up as the whole."""
    clean = wordpiece().clean_up_tokenization
    cut = detokenizer._safe_split(left)
    assert clean(left[:cut] + right) == clean(left[:cut]) + clean(right)


# -- slow tokenizer, default base -------------------------------------------------------------


@CHECKS
@given(st.lists(st.integers(0, 300), max_size=40), st.booleans())
def test_slow_tokenizer(ids: list[int], skip: bool) -> None:
    tokenizer = byt5()
    assert streamed_text(tokenizer, ids, skip_special_tokens=skip) == tokenizer.decode(ids, skip_special_tokens=skip)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(["Hello", " world", "é", "€", "😀", " don't", "<|im_end|>", "\n\n", "的"]),
                max_size=12),
       st.lists(st.integers(0, 49151), max_size=12), st.booleans())
def test_default_base_tokenizer(words: list[str], noise: list[int], skip: bool) -> None:
    tokenizer = default_base_tokenizer()
    ids = tokenizer.encode("".join(words), add_special_tokens=False) + noise
    assert streamed_text(tokenizer, ids, skip_special_tokens=skip) == tokenizer.decode(ids, skip_special_tokens=skip)


class DecodeOnly:
    """A tokenizer seen through ``decode`` alone, as a slow one is: the window decoder's path."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def decode(self, ids: list[int], **options: Any) -> str:
        return self.inner.decode(ids, **options)


@CHECKS
@given(st.lists(st.integers(0, 257), max_size=40), sentencepiece_ids(), st.lists(st.integers(0, 12), max_size=30))
def test_window_decoder_without_the_stream(tiny_ids: list[int], piece_ids: list[int], meta_ids: list[int]) -> None:
    """The Python fallback alone gives the one-shot decode too (split and invalid UTF-8, Strip,
    Metaspace), as DecodeStream does."""
    for tokenizer, ids in ((tiny(), tiny_ids), (sentencepiece_like(), piece_ids), (metaspace(), meta_ids)):
        text = streamed_text(DecodeOnly(tokenizer), ids)
        if tokenizer is not sentencepiece_like() or valid_byte_runs(tokenizer, ids):
            assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_no_tokenizer() -> None:
    chunks, rest, detok = stream(None, [1, 2, 3])
    assert chunks == ["", "", ""] and rest == "" and detok.text == ""


def test_push_after_finish_is_refused() -> None:
    detok = IncrementalDetokenizer(tiny())
    assert detok.push(byte_ids("a")[0]) == "a"
    assert detok.finish() == "" and detok.finish() == "" and detok.text == "a"
    with pytest.raises(RuntimeError):
        detok.push(byte_ids("b")[0])


# -- stop strings -----------------------------------------------------------------------------

STOPS = ["ab", "\n\n", "bba"]


def expected_release(text: str, stops: Sequence[str]) -> str:
    """Independent of the module: up to the first complete stop, else all but a tail that begins one."""
    starts = [text.find(stop) for stop in stops if stop in text]
    if starts:
        return text[:min(starts)]
    hold = max((size for stop in stops for size in range(1, len(stop)) if text.endswith(stop[:size])), default=0)
    return text[:len(text) - hold]


@CHECKS
@given(st.text(alphabet="abc\n", max_size=30))
def test_stop_strings_are_never_passed(answer: str) -> None:
    """What is released is what the text so far allows, and never reaches past a stop string's
    start in any later text."""
    tokenizer, ids = tiny(), byte_ids(answer)
    detok = IncrementalDetokenizer(tokenizer, stops=STOPS)
    released, history = "", []
    for k, token in enumerate(ids, 1):
        released += detok.push(token)
        assert released == expected_release(tokenizer.decode(ids[:k]), STOPS)
        history.append(released)
    for k, earlier in enumerate(history):
        for text in (tokenizer.decode(ids[:n]) for n in range(k + 1, len(ids) + 1)):
            starts = [text.find(stop) for stop in STOPS if stop in text]
            assert text.startswith(earlier) and len(earlier) <= min(starts, default=len(text))
    released += detok.finish()
    assert released == detok.text == tokenizer.decode(ids)


def test_stop_string_split_over_tokens_and_characters() -> None:
    """A multi-byte stop string arriving byte by byte: held back, then never released by push."""
    ids = byte_ids("say: é€ then")
    detok = IncrementalDetokenizer(tiny(), stops=["€ th"])
    released = "".join(detok.push(token) for token in ids)
    assert released == "say: é"
    assert detok.text == "say: é€ then"  # the caller cuts at the stop
    assert detok.finish() == "€ then"


def test_stop_prefix_that_does_not_complete_is_released() -> None:
    detok = IncrementalDetokenizer(tiny(), stops=["\n\nUser:"])
    assert [detok.push(token) for token in byte_ids("\n\nUx")] == ["", "", "", "\n\nUx"]


# -- cost -------------------------------------------------------------------------------------


class CountingByT5:
    """A slow tokenizer that records the length of every sequence it decodes."""

    def __init__(self) -> None:
        self.inner = byt5()
        self.lengths: list[int] = []

    def decode(self, ids: list[int], **options: Any) -> str:
        self.lengths.append(len(ids))
        return self.inner.decode(ids, **options)


@pytest.mark.parametrize("kind", ["text", "random", "invalid"])
def test_decoding_work_per_token_is_bounded(kind: str) -> None:
    """2,000 tokens, and ``text`` asked after each (as a row does): a few short decodes per token,
    never the answer so far."""
    import random

    rng = random.Random(0)
    tokenizer = CountingByT5()
    if kind == "text":
        ids = byt5().encode("héllo wörld 😀 的 " * 200, add_special_tokens=False)[:2000]
    elif kind == "random":
        ids = [rng.randrange(0, 259) for _ in range(2000)]
    else:
        ids = [rng.randrange(0x80, 0x100) + 3 for _ in range(2000)]  # continuation and lead bytes only
    detok = IncrementalDetokenizer(tokenizer, stops=["zz"])
    released = ""
    for token in ids:
        released += detok.push(token)
        _ = detok.text
    released += detok.finish()
    calls, longest = len(tokenizer.lengths), max(tokenizer.lengths)
    assert released == byt5().decode(ids, skip_special_tokens=True)
    assert calls <= 3 * len(ids)
    assert longest <= 2 * HARD_CAP
    assert sum(tokenizer.lengths) <= 4 * HARD_CAP * len(ids)


def test_the_stream_never_decodes_a_growing_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """DecodeStream decodes all the tokens since its last chunk (and the chunk's): it is given up
    for the window decoder before that run reaches :data:`FORCE_AFTER` tokens."""
    from tokenizers.decoders import DecodeStream

    runs: list[int] = [0]

    class Recording:
        def __init__(self, **options: Any) -> None:
            self.inner = DecodeStream(**options)

        def step(self, tokenizer: Any, token: int) -> str | None:
            chunk = self.inner.step(tokenizer, token)
            runs.append(runs[-1] + 1 if chunk is None else 0)
            return chunk

    monkeypatch.setattr(detokenizer, "DecodeStream", Recording)
    ids = byte_ids((b"\x80" * 100 + "ok €".encode()) * 20)
    assert streamed_text(tiny(), ids) == tiny().decode(ids)
    assert 0 < max(runs) <= FORCE_AFTER
