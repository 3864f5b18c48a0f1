"""Keyword rules compiled for RE2: matching in linear time, with Python ``re``'s meaning kept.

Rules are user regexes run on every prompt. Python's ``re`` backtracks, so a rule such as
``(a+)+$`` can take exponential time on a long prompt and stall the caller. RE2 (the
``google-re2`` bindings, module ``re2``) runs in time linear in the prompt's length for
every pattern it accepts, and refuses the constructs that need backtracking:
backreferences, lookaround, atomic groups, possessive quantifiers, conditionals.

The syntax of a rule is RE2's. Where RE2 and Python ``re`` read the same text differently
and rules written for ``re`` relied on it, :func:`to_re2` rewrites the pattern so that
whether it matches a prompt is what it was under ``re`` (``re.search(p, text) is None``):

* ``\\w \\W \\d \\D \\s \\S`` are Unicode classes, as in ``re`` (RE2's are ASCII-only);
* ``\\b`` and ``\\B`` use Unicode word characters where the character on each side of them
  is fixed by the rule or lies outside the match (every rule ``from_keywords`` makes,
  ``\\bselect\\b``, ``\\b(select|join)\\b``); elsewhere they keep RE2's ASCII meaning;
* ``$`` at the end of a rule also matches before a final newline, as in ``re``;
* ``\\Z`` is RE2's ``\\z``; ``\\uXXXX``, ``\\UXXXXXXXX``, ``\\N{name}``, ``{,n}``, ``[\\b]``
  (backspace) and ``(?#...)`` comments mean what they mean in ``re``.

The rewritten pattern is for a yes/no answer only: to test a position's neighbour without
lookaround it may consume that neighbour, so its match spans are not the rule's.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Union

try:
    import re2
except ImportError:  # pragma: no cover - google-re2 is a declared dependency
    re2 = None

logger = logging.getLogger(__name__)

#: Python's Unicode ``\w``: letters, numbers and ``_`` (``str.isalnum() or "_"``).
WORD = r"\p{L}\p{N}_"
#: Python's Unicode ``\s`` (``str.isspace()``); RE2's ``\s`` lacks ``\v`` and every non-ASCII space.
SPACE = (r"\t-\r\x{1c}-\x{20}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}"
         r"\x{205f}\x{3000}")
#: The same characters, listed.
SPACE_CHARS = ("\t\n\v\f\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
               + "\u2028\u2029\u202f\u205f\u3000")
#: A class no character is in: a ``\b`` that can never hold.
NEVER = r"[^\x00-\x{10ffff}]"
_IS_WORD = f"(?-i:[{WORD}])"
_NOT_WORD = f"(?-i:[^{WORD}])"
# Each class escape as Python reads it, for use outside brackets. (?-i:...) keeps RE2's case
# folding from adding characters (e.g. U+0345, which folds with the letter iota) to the class.
_CATEGORY = {"w": _IS_WORD, "W": _NOT_WORD, "d": r"(?-i:\p{Nd})", "D": r"(?-i:\P{Nd})",
             "s": f"(?-i:[{SPACE}])", "S": f"(?-i:[^{SPACE}])"}
# Inside brackets, the escapes whose Python meaning is a union RE2 can write there.
_IN_BRACKETS = {"w": WORD, "d": r"\p{Nd}", "D": r"\P{Nd}", "s": SPACE}
# Whether every character a class escape matches is a word character (None: some are, some not).
_CATEGORY_WORD = {"w": True, "W": False, "d": True, "D": None, "s": False, "S": None}
# [^\W...] idioms: word characters less "_" and/or digits.
_NOT_NONWORD = {("", ""): WORD, ("", "_"): r"\p{L}\p{N}", ("d", ""): r"\p{L}\p{Nl}\p{No}_",
                ("d", "_"): r"\p{L}\p{Nl}\p{No}"}
_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a"}
# Python's re reads these from the rule's text (never from a prompt); none can backtrack much.
_QUANTIFIER = re.compile(r"[*+?]|\{(\d*)(,?)(\d*)\}")
_NAMED_OR_PLAIN_GROUP = re.compile(r"\(\?(P?<[A-Za-z_][A-Za-z0-9_]*>|:)")
_FLAGS_GROUP = re.compile(r"\(\?([A-Za-z]*)(?:-([A-Za-z]*))?([:)])")
_PROPERTY = re.compile(r"\\[pP](\{[^}]*\}|[A-Za-z])")
_POSIX_CLASS = re.compile(r"\[:\^?[a-z]+:\]")
_RANGE_LIMIT = 4096  # classes wider than this are not enumerated to learn their word-ness

#: Why RE2 refuses what it refuses, and what to do: the tail of every refusal.
ADVICE = ("Keyword rules run on RE2, which matches in time linear in the prompt and so has no "
          "backreferences (\\1, (?P=name)), lookaround ((?=...), (?!...), (?<=...), (?<!...)), "
          "atomic groups, possessive quantifiers or conditionals. Rewrite the rule without them "
          "(match a wider pattern, or split it into several rules); syntax: "
          "https://github.com/google/re2/wiki/Syntax")


class PatternError(ValueError):
    """A rule RE2 cannot run; its message says why (without the rule, which callers add)."""


@dataclass
class _Char:
    """One literal character (``text`` is its RE2 spelling)."""

    char: str
    text: str


@dataclass
class _Set:
    """Consumes one character of a set; ``word``: all word chars (True), none (False), or mixed."""

    text: str
    word: bool | None


@dataclass
class _Assert:
    """A zero-width assertion; ``kind`` is ``"b"``, ``"B"``, ``"$"`` or ``"other"``."""

    kind: str
    text: str


@dataclass
class _Flags:
    """``(?i)`` and the like: zero-width, and no constraint on the neighbours."""

    text: str


@dataclass
class _Group:
    """A group: its opening (``(``, ``(?:``, ``(?P<n>``, ``(?i:``) and its alternatives."""

    opening: str
    alternatives: list[list[_Node]]


@dataclass
class _Repeat:
    """An item with a quantifier; ``minimum`` is its least number of repetitions."""

    item: _Node
    quantifier: str
    minimum: int


_Node = Union[_Char, _Set, _Assert, _Flags, _Group, _Repeat]
_OUTSIDE = "outside"  # a boundary's neighbour that lies outside the match


def _is_word(char: str) -> bool:
    return char.isalnum() or char == "_"


def _hex(char: str) -> str:
    return f"\\x{{{ord(char):x}}}"


def _literal(char: str) -> str:
    """A safe RE2 spelling of one character (plain for ASCII letters and digits)."""
    return char if char.isascii() and char.isalnum() else _hex(char)


class _Parser:
    """Reads a rule into nodes: just enough structure to rewrite it (RE2 checks the rest)."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.pos = 0
        self.multiline = False

    def parse(self) -> list[list[_Node]]:
        alternatives = self._alternatives(depth=0)
        if self.pos < len(self.pattern):
            raise PatternError(f"unbalanced ')' at offset {self.pos}")
        return alternatives

    def _peek(self, text: str) -> bool:
        return self.pattern.startswith(text, self.pos)

    def _alternatives(self, depth: int) -> list[list[_Node]]:
        alternatives: list[list[_Node]] = [[]]
        while self.pos < len(self.pattern):
            char = self.pattern[self.pos]
            if char == ")":
                if depth == 0:
                    raise PatternError(f"unbalanced ')' at offset {self.pos}")
                return alternatives
            if char == "|":
                self.pos += 1
                alternatives.append([])
                continue
            if self._peek("\\Q"):  # RE2's quoted literal text: a run of characters
                end = self.pattern.find("\\E", self.pos + 2)
                end = len(self.pattern) if end < 0 else end
                chars = [_Char(c, _hex(c)) for c in self.pattern[self.pos + 2:end]]
                self.pos = min(end + 2, len(self.pattern))
                if not chars:
                    continue
                alternatives[-1].extend(chars[:-1])
                node: _Node = chars[-1]
            elif self._peek("(?#"):  # a comment, skipped as re skips it
                end = self.pattern.find(")", self.pos)
                if end < 0:
                    raise PatternError(f"missing ')' closing the comment at offset {self.pos}")
                self.pos = end + 1
                continue
            else:
                node = self._atom(depth)
            alternatives[-1].append(self._quantified(node))
        if depth:
            raise PatternError("missing ')': a group is not closed")
        return alternatives

    def _quantified(self, node: _Node) -> _Node:
        while match := _QUANTIFIER.match(self.pattern, self.pos):
            text = written = match.group(0)
            if text.startswith("{"):
                low, comma, high = match.groups()
                if not low and not comma:
                    break  # "{}": a literal brace, as in re
                text = "{" + (low or "0") + comma + high + "}"  # re's {,n} is {0,n}
                minimum = int(low or 0)
            else:
                minimum = 1 if text == "+" else 0
            self.pos = match.end()
            if self._peek("?"):
                text += "?"
                self.pos += 1
            elif self._peek("+"):
                raise PatternError(f"possessive quantifier {written}+ at offset {match.start()}")
            node = _Repeat(node, text, minimum)
        return node

    def _atom(self, depth: int) -> _Node:
        char = self.pattern[self.pos]
        if char == "(":
            return self._group(depth)
        if char == "[":
            return self._brackets()
        if char == "\\":
            return self._escape()
        self.pos += 1
        if char == ".":
            return _Set(".", None)
        if char == "^":
            return _Assert("other", "^")
        if char == "$":
            return _Assert("$", "$")
        if char in "*+?":  # nothing to repeat: RE2 says so
            return _Set(char, None)
        return _Char(char, _literal(char) if char in "{}" or not char.isascii() else char)

    def _group(self, depth: int) -> _Node:
        start = self.pos
        if not self._peek("(?"):
            opening = "("
        elif match := _NAMED_OR_PLAIN_GROUP.match(self.pattern, start):
            opening = match.group(0)
        elif match := _FLAGS_GROUP.match(self.pattern, start):
            flags = match.group(1) + (match.group(2) or "")
            if unknown := sorted(set(flags) - set("imsU")):
                raise PatternError(f"inline flag(s) {''.join(unknown)} in {match.group(0)!r} at offset "
                                   f"{start}: RE2 knows the flags i, m, s and U only")
            self.multiline = self.multiline or "m" in match.group(1)
            self.pos = match.end()
            if match.group(3) == ")":
                return _Flags(match.group(0))
            opening = match.group(0)
        else:
            raise PatternError(self._refused_group(start))
        self.pos = start + len(opening)
        alternatives = self._alternatives(depth + 1)
        self.pos += 1  # the ")" that _alternatives stopped at
        return _Group(opening, alternatives)

    def _refused_group(self, start: int) -> str:
        kinds = {"(?=": "lookahead (?=...)", "(?!": "negative lookahead (?!...)",
                 "(?<=": "lookbehind (?<=...)", "(?<!": "negative lookbehind (?<!...)",
                 "(?P=": "backreference (?P=name)", "(?>": "atomic group (?>...)",
                 "(?(": "conditional (?(...)...)"}
        for opening, kind in kinds.items():
            if self._peek(opening):
                return f"{kind} at offset {start}"
        return f"unknown group syntax {self.pattern[start:start + 4]!r} at offset {start}"

    def _escape(self) -> _Node:
        start = self.pos
        if start + 1 >= len(self.pattern):
            raise PatternError("trailing backslash at the end of the pattern")
        letter = self.pattern[start + 1]
        self.pos += 2
        if letter in _CATEGORY:
            return _Set(_CATEGORY[letter], _CATEGORY_WORD[letter])
        if letter in "bB":
            return _Assert(letter, "\\" + letter)
        if letter == "A":
            return _Assert("other", r"\A")
        if letter in "zZ":
            return _Assert("other", r"\z")
        if letter in "123456789" and not re.match(r"[0-7]{3}", self.pattern[start + 1:start + 4]):
            number = re.match(r"\d\d?", self.pattern[start + 1:]).group(0)
            raise PatternError(f"backreference \\{number} at offset {start}")
        if letter in "pP" and (match := _PROPERTY.match(self.pattern, start)):
            self.pos = match.end()
            return _Set(match.group(0), None)  # \pL, \p{Greek}
        if letter.isascii() and letter.isalpha() and letter not in "xuUN" + "".join(_SIMPLE_ESCAPES):
            return _Set(self.pattern[start:self.pos], None)  # \C and the like: RE2 checks it
        self.pos = start
        char = self._escaped_char(in_brackets=False)
        return _Char(char, _hex(char))

    def _escaped_char(self, in_brackets: bool) -> str:
        """The character of an escape that stands for one (``\\n``, ``\\x41``, ``\\N{..}``, ``\\.``)."""
        start = self.pos
        letter = self.pattern[start + 1]
        patterns = {"x": r"\\x(?:\{([0-9A-Fa-f]{1,6})\}|([0-9A-Fa-f]{2}))", "u": r"\\u([0-9A-Fa-f]{4})",
                    "U": r"\\U([0-9A-Fa-f]{8})", "0": r"\\([0-7]{1,3})"}
        if letter in patterns or letter in "0123456789":
            match = re.compile(patterns.get(letter, r"\\([0-7]{1,3})")).match(self.pattern, start)
            if match is None:
                raise PatternError(f"bad escape {self.pattern[start:start + 4]!r} at offset {start}")
            digits = next(group for group in match.groups() if group)
            value = int(digits, 8 if letter not in "xuU" else 16)
            if value > 0x10FFFF:
                raise PatternError(f"escape {match.group(0)!r} at offset {start} is beyond U+10FFFF")
            self.pos = match.end()
            return chr(value)
        if letter == "N":
            match = re.compile(r"\\N\{([^}]*)\}").match(self.pattern, start)
            try:
                char = unicodedata.lookup(match.group(1)) if match else ""
            except KeyError:
                char = ""
            if len(char) != 1:
                raise PatternError(f"bad character name escape {self.pattern[start:start + 30]!r} at offset "
                                   f"{start}")
            self.pos = match.end()
            return char
        self.pos = start + 2
        if in_brackets and letter == "b":
            return "\b"  # backspace, inside brackets
        if letter in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[letter]
        if letter.isascii() and letter.isalnum():
            raise PatternError(f"bad escape \\{letter} at offset {start}")
        return letter

    def _brackets(self) -> _Node:
        """A ``[...]`` class: RE2 spelling, its class escapes pulled out as Python reads them."""
        start = self.pos
        self.pos += 1
        negated = self._peek("^")
        self.pos += negated
        parts: list[str] = []
        categories: list[str] = []
        spans: list[tuple[int, int] | None] = []  # literal ranges, None for an unknown item
        first = True
        while True:
            if self.pos >= len(self.pattern):
                raise PatternError(f"missing ']' for the '[' at offset {start}")
            char = self.pattern[self.pos]
            if char == "]" and not first:
                self.pos += 1
                break
            first = False
            if match := _POSIX_CLASS.match(self.pattern, self.pos):
                parts.append(match.group(0))  # RE2's [:alpha:]
                spans.append(None)
                self.pos = match.end()
                continue
            if char == "\\" and self.pattern[self.pos + 1:self.pos + 2] in _CATEGORY:
                categories.append(self.pattern[self.pos + 1])
                self.pos += 2
                continue
            if char == "\\" and self.pattern[self.pos + 1:self.pos + 2] in ("p", "P"):
                match = _PROPERTY.match(self.pattern, self.pos)
                end = match.end() if match else self.pos + 2
                parts.append(self.pattern[self.pos:end])
                spans.append(None)
                self.pos = end
                continue
            low = self._bracket_char()
            high = low
            if self._peek("-") and self.pattern[self.pos + 1:self.pos + 2] not in ("]", ""):
                self.pos += 1
                if self.pattern[self.pos] == "\\" and self.pattern[self.pos + 1:self.pos + 2] in (
                        *_CATEGORY, "p", "P"):
                    raise PatternError(f"bad character range at offset {self.pos - 1}")
                high = self._bracket_char()
                if ord(high) < ord(low):
                    raise PatternError(f"bad character range {low!r}-{high!r} at offset {start}")
            parts.append(_literal(low) if low == high else f"{_literal(low)}-{_literal(high)}")
            spans.append((ord(low), ord(high)))
        return _bracket_node("".join(parts), categories, spans, negated)

    def _bracket_char(self) -> str:
        if self.pattern[self.pos] == "\\":
            if self.pos + 1 >= len(self.pattern):
                raise PatternError("trailing backslash at the end of the pattern")
            return self._escaped_char(in_brackets=True)
        self.pos += 1
        return self.pattern[self.pos - 1]


def _chars(spans: list[tuple[int, int] | None]) -> str | None:
    """Every character of literal ranges, or None when unknown or too many."""
    if any(span is None for span in spans) or sum(hi - lo + 1 for lo, hi in spans) > _RANGE_LIMIT:
        return None
    return "".join(chr(c) for lo, hi in spans for c in range(lo, hi + 1))


def _bracket_node(literals: str, categories: list[str], spans: list[tuple[int, int] | None],
                  negated: bool) -> _Set:
    """A bracket class for RE2: ``literals`` (RE2 spelling) and Python's class escapes in it."""
    chars = _chars(spans)
    if not negated:
        kinds = {_CATEGORY_WORD[c] for c in categories}
        if chars is not None:
            kinds |= {_is_word(c) for c in chars}
        word = kinds.pop() if len(kinds) == 1 and chars is not None else None
        if not categories:
            return _Set(f"[{literals}]", word)
        branches = ([f"[{literals}]"] if literals else []) + [_CATEGORY[c] for c in dict.fromkeys(categories)]
        return _Set("(?:" + "|".join(branches) + ")", word)
    caseless = chars is not None and all(c.lower() == c == c.upper() for c in chars)
    if not categories:
        return _Set(f"[^{literals}]", None)
    if not set(categories) & {"W", "S"}:
        union = "".join(_IN_BRACKETS[c] for c in dict.fromkeys(categories))
        text = f"[^{literals}{union}]"
        return _Set(f"(?-i:{text})" if caseless else text, None)
    kinds = "".join(sorted(set(categories) - {"W"}))
    if set(categories) >= {"W"} and kinds in ("", "d") and chars in ("", "_"):
        return _Set(f"(?-i:[{_NOT_NONWORD[kinds, chars]}])", True)  # [^\W_], [^\W\d_], ...
    if categories == ["S"] and chars is not None:  # [^\S\n]: the spaces the class leaves out
        kept = "".join(_hex(c) for c in SPACE_CHARS if c not in chars)
        return _Set(f"(?-i:[{kept}])" if kept else NEVER, False)
    ascii_escapes = "".join("\\" + c for c in categories)  # \W or \S in another negated class:
    return _Set(f"[^{literals}{ascii_escapes}]", None)  # RE2's ASCII meaning (documented)


def _edge_word(node: _Node, last: bool) -> bool | None:
    """Whether the first (or last) character ``node`` consumes is a word character, if fixed."""
    if isinstance(node, _Char):
        return _is_word(node.char)
    if isinstance(node, _Set):
        return node.word
    if isinstance(node, _Repeat):
        return _edge_word(node.item, last) if node.minimum > 0 else None
    if isinstance(node, _Group):
        values = {_sequence_edge_word(alternative, last) for alternative in node.alternatives}
        return values.pop() if len(values) == 1 else None
    return None


def _sequence_edge_word(sequence: list[_Node], last: bool) -> bool | None:
    consuming = [node for node in sequence if not isinstance(node, (_Assert, _Flags))]
    if not consuming:
        return None
    return _edge_word(consuming[-1] if last else consuming[0], last)


def _neighbour(node: _Node, before: bool) -> bool | None:
    """What the character next to a boundary is, from the node on that side (None: unknown)."""
    if isinstance(node, _Assert):
        # Right after ^ or \A comes the start or a newline; right before $ or \z, the end or
        # a newline: not word characters, in multi-line mode too.
        if before and node.text in ("^", r"\A") or not before and (node.kind == "$" or node.text == r"\z"):
            return False
        return None
    return _edge_word(node, last=before)


def _boundary(word_boundary: bool, before: Any, after: Any, native: str) -> str:
    """``\\b`` (or ``\\B``) with Unicode word characters, given what each side is known to be."""
    if before == _OUTSIDE and after in (True, False):
        needed = (not after) if word_boundary else after  # the character before the match
        return _IS_WORD if needed else rf"(?:\A|{_NOT_WORD})"
    if after == _OUTSIDE and before in (True, False):
        needed = (not before) if word_boundary else before  # the character after the match
        return _IS_WORD if needed else rf"(?:{_NOT_WORD}|\z)"
    if before in (True, False) and after in (True, False):
        return "" if (before != after) == word_boundary else NEVER
    return native


def _emit(sequence: list[_Node], at_start: bool, at_end: bool, multiline: bool) -> str:
    out = []
    for index, node in enumerate(sequence):
        before = [n for n in sequence[:index] if not isinstance(n, _Flags)]
        after = [n for n in sequence[index + 1:] if not isinstance(n, _Flags)]
        if isinstance(node, _Assert) and node.kind in ("b", "B"):
            left = _OUTSIDE if at_start and not before else _neighbour(before[-1], True) if before else None
            right = _OUTSIDE if at_end and not after else _neighbour(after[0], False) if after else None
            out.append(_boundary(node.kind == "b", left, right, node.text))
        elif isinstance(node, _Assert) and node.kind == "$" and at_end and not after and not multiline:
            out.append(r"(?:\n?\z)")  # re's $: the end, or just before a final newline
        elif isinstance(node, _Group):
            inner = (_emit(alternative, at_start and not before, at_end and not after, multiline)
                     for alternative in node.alternatives)
            out.append(node.opening + "|".join(inner) + ")")
        elif isinstance(node, _Repeat):
            out.append(_emit([node.item], False, False, multiline) + node.quantifier)
        else:
            out.append(node.text)
    return "".join(out)


def to_re2(pattern: str) -> str:
    """Rewrite a rule for RE2 so that whether it matches a prompt is what it was under ``re``.

    Args:
        pattern: The rule (RE2 syntax; also read: the ``re`` spellings listed in the module doc).

    Returns:
        An RE2 pattern to search with; only its yes/no answer is meaningful.

    Raises:
        PatternError: The rule uses a construct RE2 refuses (named in the message), or is
            malformed.
    """
    parser = _Parser(pattern)
    alternatives = parser.parse()
    return "|".join(_emit(alternative, True, True, parser.multiline) for alternative in alternatives)


@dataclass(frozen=True)
class CompiledPattern:
    """One rule compiled with RE2.

    Attributes:
        pattern: The rule as given.
        re2_pattern: What RE2 compiled (see :func:`to_re2`).
        case_sensitive: Whether letters match their own case only.
        regex: The RE2 regex object (``re2.compile`` of ``re2_pattern``).
    """

    pattern: str
    re2_pattern: str
    case_sensitive: bool
    regex: Any

    def search(self, text: str | bytes) -> bool:
        """Whether the rule matches anywhere in ``text`` (a prompt, or :func:`encode_text` of one)."""
        data = text if isinstance(text, bytes) else encode_text(text)
        return self.regex.search(data) is not None


def compile_pattern(pattern: str, *, case_sensitive: bool = False) -> CompiledPattern:
    """Compile one rule with RE2 (time linear in the prompt's length, whatever the rule).

    Args:
        pattern: The rule.
        case_sensitive: Match letters in their own case only (default: any case).

    Returns:
        The compiled rule.

    Raises:
        PatternError: RE2 cannot compile it; the message says why (not which rule).
        moa.errors.MissingDependencyError: ``google-re2`` is not installed.
    """
    if re2 is None:  # pragma: no cover - a declared dependency
        from moa.errors import MissingDependencyError

        raise MissingDependencyError("moa-router-keyword compiles its rules with RE2, from the google-re2 "
                                     "package, which is not installed: pip install 'google-re2>=1.1'.")
    translated = to_re2(pattern)
    options = re2.Options()
    options.case_sensitive = case_sensitive
    options.never_capture = True  # a yes/no answer needs no groups, and RE2 is faster without
    options.log_errors = False  # the error comes back in the exception instead of on stderr
    try:
        regex = re2.compile(translated, options)
    except re2.error as error:
        reason = error.args[0].decode("utf-8", "replace") if error.args and isinstance(
            error.args[0], bytes) else str(error)
        hint = ""
        if "repetition size" in reason:
            hint = " (RE2 repeats at most 1000 times: {0,1000})"
        elif "too large" in reason or "too big" in reason:
            hint = " (the compiled program exceeds RE2's memory budget: simplify it, or split the rule)"
        raise PatternError(f"RE2 refuses it: {reason}{hint}") from error
    except UnicodeEncodeError as error:  # RE2 reads UTF-8: a lone surrogate (from JSON) is not text
        raise PatternError(f"it holds {error.object[error.start:error.end]!r}, a lone surrogate, which "
                           f"is not text RE2 can read") from error
    logger.debug("Keyword rule %r compiled for RE2 as %r.", pattern, translated)
    return CompiledPattern(pattern, translated, case_sensitive, regex)


def encode_text(text: str) -> bytes:
    """A prompt as the UTF-8 bytes RE2 reads; lone surrogates become U+FFFD (``re`` reads them as
    one character each that is not a word character or space, as U+FFFD is)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.translate(_SURROGATES).encode("utf-8")


_SURROGATES = dict.fromkeys(range(0xD800, 0xE000), 0xFFFD)
