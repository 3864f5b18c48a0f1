"""KeywordRouter: regex rules from the prompt's text to adapter weights, no training.

Each rule is ``(pattern, {adapter: weight})``. A request's text is searched with every
rule, in order (case-insensitive unless asked otherwise):

* ``mode="first"``: the first matching rule's weights are the row's mixture;
* ``mode="sum"``: the weights of every matching rule are added up.

When no rule matches, the row gets ``default`` (a mixture, or ``None`` = the base
model). Rules naming adapters the model has not loaded are skipped (logged once), so one
rule file can serve deployments with different adapter sets. The router saves to a
folder holding ``router_config.json`` (rules are plain JSON; no tensors).

Rules are compiled with RE2 (:mod:`moa_router_keyword.patterns`), so searching a prompt
takes time linear in its length whatever the rule: no rule can backtrack catastrophically
and stall the caller. A rule RE2 cannot run (backreferences, lookaround) is refused when
the router is built or loaded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moa.adapters.file_checks import read_json_file
from moa.errors import RoutingError
from moa.routing import Router, RoutingDecision, RoutingRequest
from moa_router_keyword.patterns import ADVICE, PatternError, compile_pattern, encode_text

logger = logging.getLogger(__name__)

CONFIG_NAME = "router_config.json"
FORMAT_VERSION = 1
Mode = Literal["first", "sum"]
MODES: tuple[str, ...] = ("first", "sum")


def _check_mixture(weights: Mapping[str, Any], where: str) -> dict[str, float]:
    if not isinstance(weights, Mapping) or not weights:
        raise RoutingError(f"{where}: weights must be a non-empty dict {{adapter: weight}}; got {weights!r}.")
    checked: dict[str, float] = {}
    for name, weight in weights.items():
        if not isinstance(name, str) or not name:
            raise RoutingError(f"{where}: adapter names must be non-empty strings; got {name!r}.")
        try:
            value = float(weight)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise RoutingError(f"{where}: weight {weight!r} for {name!r} is not a finite number >= 0.")
        checked[name] = value
    return checked


@dataclass(frozen=True)
class KeywordRule:
    """One rule: a regex and the mixture it sends matching prompts to.

    Attributes:
        pattern: A regex (RE2 syntax) searched anywhere in the prompt (``r"\\bselect\\b"``).
        weights: ``{adapter name: weight >= 0}``.
    """

    pattern: str
    weights: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The rule as stored in ``router_config.json``."""
        return {"pattern": self.pattern, "weights": dict(self.weights)}


RuleLike = KeywordRule | tuple[str, Mapping[str, float]] | Mapping[str, Any]


def _as_rule(rule: RuleLike, index: int) -> KeywordRule:
    if isinstance(rule, KeywordRule):
        pattern, weights = rule.pattern, rule.weights
    elif isinstance(rule, Mapping):
        pattern, weights = rule.get("pattern"), rule.get("weights")
    elif isinstance(rule, Sequence) and not isinstance(rule, str) and len(rule) == 2:
        pattern, weights = rule
    else:
        raise RoutingError(f"Rule {index}: expected (pattern, {{adapter: weight}}), a KeywordRule "
                           f"or {{'pattern': ..., 'weights': ...}}; got {rule!r}.")
    if not isinstance(pattern, str) or not pattern:
        raise RoutingError(f"Rule {index}: the pattern must be a non-empty regex string; got {pattern!r}.")
    return KeywordRule(pattern, _check_mixture(weights, f"Rule {index} ({pattern!r})"))


class KeywordRouter(Router):
    """Route each request by regex rules over its text.

    Args:
        rules: ``(pattern, {adapter: weight})`` pairs (or :class:`KeywordRule` s), in order.
        mode: ``"first"`` (first matching rule wins) or ``"sum"`` (add every match's weights).
        default: Mixture for rows no rule matches: an adapter name, a ``{name: weight}``
            dict, or ``None`` (the base model).
        normalize: Rescale each row's weights to sum to 1.
        case_sensitive: Match case-sensitively (default: ignore case).
        tokenizer: Used to decode ``input_ids`` when a request has no ``texts`` (inside
            ``model(input_ids)`` / ``generate``); ``model.route([...])`` passes the texts.

    Raises:
        RoutingError: A pattern RE2 cannot compile (it names the rule and why: RE2 has no
            backreferences or lookaround), a bad weight or mode.

    Example::

        router = KeywordRouter([(r"\\b(select|join)\\b", {"sql": 1.0}),
                                (r"\\bdef\\b|import ", {"code": 1.0})],
                               default={"chat": 1.0}, tokenizer=model.tokenizer)
        model.set_router(router)
        model.route(["SELECT * FROM t"])   # [{"sql": 1.0}]
    """

    name = "keyword"
    level = "sequence"

    def __init__(
        self,
        rules: Iterable[RuleLike],
        *,
        mode: Mode = "first",
        default: str | Mapping[str, float] | None = None,
        normalize: bool = False,
        case_sensitive: bool = False,
        tokenizer: Any = None,
    ) -> None:
        if mode not in MODES:
            raise RoutingError(f"KeywordRouter mode {mode!r} is not one of {', '.join(MODES)}.")
        self.rules = [_as_rule(rule, i) for i, rule in enumerate(rules)]
        self.mode: Mode = mode
        self.default = (None if default is None else
                        {default: 1.0} if isinstance(default, str) else _check_mixture(default, "default"))
        self.normalize = bool(normalize)
        self.case_sensitive = bool(case_sensitive)
        self.tokenizer = tokenizer
        self._compiled = []
        for i, rule in enumerate(self.rules):
            try:
                self._compiled.append(compile_pattern(rule.pattern, case_sensitive=self.case_sensitive))
            except PatternError as error:
                raise RoutingError(f"Rule {i}: pattern {rule.pattern!r} is not a valid regex for RE2 "
                                   f"({error}). {ADVICE}.") from error
        self._warned: set[str] = set()

    @classmethod
    def from_keywords(cls, keywords: Mapping[str, Iterable[str]], **kwargs: Any) -> KeywordRouter:
        """One rule per keyword: ``{"sql": ["select", "join"]}`` -> ``r"\\bselect\\b"`` -> sql.

        Keywords are literal (regex-escaped) and matched as whole words where they start
        and end with a word character. With ``mode="sum"`` a row's weight for an adapter
        is the number of its keywords found.

        Args:
            keywords: Adapter name -> its keywords; rule order follows this mapping.
            **kwargs: The other :class:`KeywordRouter` arguments.
        """
        rules = []
        for adapter, words in keywords.items():
            for word in words:
                escaped = re.escape(word)
                left = r"\b" if re.match(r"\w", word) else ""
                right = r"\b" if re.search(r"\w$", word) else ""
                rules.append((f"{left}{escaped}{right}", {adapter: 1.0}))
        return cls(rules, **kwargs)

    # -- routing ---------------------------------------------------------------------------

    def mixture_for(self, text: str, loaded: Sequence[str] | None = None) -> dict[str, float] | None:
        """The mixture of one prompt (``None`` = base model).

        Args:
            text: The prompt.
            loaded: Adapter names the model has; rule entries naming others are dropped
                (a rule left with no entry does not match). ``None``: keep every name.
        """
        available = None if loaded is None else set(loaded)
        total: dict[str, float] = {}
        data = encode_text(text)  # once for every rule
        for rule, compiled in zip(self.rules, self._compiled, strict=True):
            weights = self._available(rule.weights, available)
            if not weights or not compiled.search(data):
                continue
            for adapter, weight in weights.items():
                total[adapter] = total.get(adapter, 0.0) + weight
            if self.mode == "first":
                break
        if not total:
            total = self._available(self.default or {}, available)
        if not total:
            return None
        if self.normalize:
            norm = sum(total.values())
            total = {k: v / norm for k, v in total.items()} if norm > 0 else total
        return total

    def route(self, request: RoutingRequest) -> RoutingDecision:
        """One mixture per row, from ``request.texts`` or the decoded ``input_ids``."""
        loaded = list(request.adapter_names)
        mixtures = [self.mixture_for(text, loaded) for text in self.texts_of(request)]
        return RoutingDecision.from_mixtures(mixtures, loaded)

    def texts_of(self, request: RoutingRequest) -> list[str]:
        """The prompts of a request: its ``texts``, else its ``input_ids`` decoded.

        Raises:
            RoutingError: No texts and no tokenizer to decode with.
        """
        if request.texts is not None:
            return [str(t) for t in request.texts]
        if self.tokenizer is None:
            raise RoutingError(
                "KeywordRouter needs the prompts' text: call model.route([...texts...]), or build "
                "the router with tokenizer=model.tokenizer so it can decode input_ids.")
        rows = []
        mask = request.attention_mask
        for i, ids in enumerate(request.input_ids):
            if mask is not None:
                ids = ids[mask[i].bool()]
            rows.append(self.tokenizer.decode(ids.tolist(), skip_special_tokens=True))
        return rows

    def _available(self, weights: Mapping[str, float], available: set[str] | None) -> dict[str, float]:
        if available is None:
            return dict(weights)
        kept = {k: v for k, v in weights.items() if k in available}
        for missing in set(weights) - available - self._warned:
            self._warned.add(missing)
            logger.warning("KeywordRouter: adapter %r named by a rule is not loaded; its entries "
                           "are skipped. Loaded: %s.", missing, ", ".join(sorted(available)) or "(none)")
        return kept

    # -- persistence -----------------------------------------------------------------------

    def to_config(self) -> dict[str, Any]:
        """The router as stored in ``router_config.json``."""
        return {
            "router": self.name,
            "format_version": FORMAT_VERSION,
            "mode": self.mode,
            "normalize": self.normalize,
            "case_sensitive": self.case_sensitive,
            "default": self.default,
            "rules": [rule.to_dict() for rule in self.rules],
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``router_config.json`` into ``directory`` (atomically).

        Returns:
            The folder.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        data = json.dumps(self.to_config(), indent=2, sort_keys=True) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{CONFIG_NAME}.", dir=path)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(data)
            os.replace(tmp, path / CONFIG_NAME)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike, tokenizer: Any = None) -> KeywordRouter:
        """Read a folder written by :meth:`save`.

        Args:
            directory: The router folder.
            tokenizer: As in the constructor (not saved).

        Raises:
            RoutingError: Missing or malformed ``router_config.json``, or another router's folder.
        """
        config_path = Path(directory) / CONFIG_NAME
        if not config_path.exists():
            raise RoutingError(f"{str(config_path)!r} does not exist; save a KeywordRouter there "
                               f"first (router.save(folder)).")
        config = read_json_file(config_path, RoutingError, folder=Path(directory))
        if config.get("router") != cls.name:
            raise RoutingError(f"{str(config_path)!r} holds a {str(config.get('router'))[:40]!r} router "
                               f"(field router), not {cls.name!r}.")
        version = config.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
            raise RoutingError(f"{str(config_path)!r} has format_version {str(version)[:40]}; "
                               f"this moa-router-keyword reads integers up to {FORMAT_VERSION}. Upgrade it.")
        rules = config.get("rules", [])
        if not isinstance(rules, list):
            raise RoutingError(f"{str(config_path)!r}: field rules = {str(rules)[:60]!r} must be a list of "
                               f"{{'pattern': regex, 'weights': {{adapter: weight}}}}.")
        try:
            return cls(rules, mode=config.get("mode", "first"), default=config.get("default"),
                       normalize=config.get("normalize", False),
                       case_sensitive=config.get("case_sensitive", False), tokenizer=tokenizer)
        except RoutingError as error:
            raise RoutingError(f"{str(config_path)!r}: {error}") from error

    def __repr__(self) -> str:
        return f"KeywordRouter(rules={len(self.rules)}, mode={self.mode!r}, default={self.default!r})"
