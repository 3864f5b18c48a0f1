"""Which request fields ``moa serve`` honours, which it takes only where they change nothing,
and which it refuses: never a field silently ignored.

A request field is one of:

* **honoured**: a field of the endpoint's request model (:mod:`moa.serve.protocol`);
* **inert**: a field of OpenAI's or vLLM's API that moa does not implement, accepted only at
  the value that asks for nothing (``frequency_penalty: 0``, ``best_of: 1``,
  ``tool_choice: "none"``...) or, for pure metadata (``metadata``, ``service_tier``...),
  at any value; any other value is refused with a 400 naming the field and why;
* **unknown**: anything else, refused with a 400 naming the field and the fields there are.

A ``null`` value counts as absent (clients send ``"tools": null``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

#: Where the supported fields are listed for users.
DOCS_PAGE = "docs/evaluating.md"

_TOOLS = ("moa serve has no tool-call parser, so it never returns tool_calls. Describe the tools in the prompt "
          "and parse the answer yourself (response_format json_schema can force the arguments' shape), or drop it.")
_PENALTIES = "repetition penalties are not implemented; drop it or set it to its neutral value."
_GUIDED = ("vLLM's guided-decoding fields are not served; use response_format {\"type\": \"json_schema\", "
           "\"json_schema\": {\"name\": ..., \"schema\": {...}}} (or {\"type\": \"json_object\"}).")


def _always(value: Any) -> bool:
    return True


def _never(value: Any) -> bool:
    return False


def _is(expected: Any) -> Callable[[Any], bool]:
    """Accepts ``expected`` only (``0`` and ``0.0`` alike; booleans only as themselves)."""
    def accepts(value: Any) -> bool:
        if isinstance(expected, bool) or isinstance(value, bool):
            return value is expected
        return type(value) in (int, float, str) and value == expected

    return accepts


#: field -> (accepted when, why any other value is refused).
INERT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "best_of": (_is(1), "best_of (sampling several completions and returning the most likely) is not supported; "
                        "ask for n choices with logprobs and rank them yourself."),
    "suffix": (_is(""), "suffix (fill-in-the-middle) is not supported."),
    "tools": (lambda v: v == [], _TOOLS),
    "tool_choice": (_is("none"), _TOOLS),
    "functions": (lambda v: v == [], _TOOLS),
    "function_call": (_is("none"), _TOOLS),
    "parallel_tool_calls": (_always, ""),  # only means something with tools, which are refused
    "frequency_penalty": (_is(0), _PENALTIES),
    "presence_penalty": (_is(0), _PENALTIES),
    "repetition_penalty": (_is(1), _PENALTIES),
    "logit_bias": (lambda v: v == {}, "logit_bias is not implemented."),
    "top_k": (lambda v: v in (-1, 0) and type(v) is int, "top-k sampling is not implemented; use top_p."),
    "min_p": (_is(0), "min-p sampling is not implemented; use top_p."),
    "ignore_eos": (_is(False), "ignoring EOS is not implemented; use min_tokens to keep EOS out up to a length."),
    "include_stop_str_in_output": (_is(False), "the stop string is never part of the text."),
    "skip_special_tokens": (_is(True), "special tokens are always left out of the text."),
    "spaces_between_special_tokens": (_is(True), "special tokens are always left out of the text."),
    "echo": (_is(False), "echo is served on /v1/completions only."),
    "add_generation_prompt": (_is(True), "chat prompts always end with the assistant's generation prompt."),
    "continue_final_message": (_is(False), "continuing the last assistant message is not supported."),
    "chat_template": (_never, "the base's own chat template is always used."),
    "chat_template_kwargs": (_never, "the base's own chat template is always used, without arguments."),
    "truncate_prompt_tokens": (_never, "prompts are never truncated; a prompt beyond the context gets a 400."),
    "modalities": (lambda v: v == ["text"], "moa serve answers with text only."),
    "audio": (_never, "moa serve answers with text only."),
    "prediction": (_never, "predicted outputs are not supported."),
    "reasoning_effort": (_never, "the served bases have no reasoning mode."),
    "web_search_options": (_never, "moa serve does not search the web."),
    "store": (_is(False), "moa serve stores no completions."),
    "priority": (_is(0), "all requests are served first come, first served."),
    "guided_json": (_never, _GUIDED),
    "guided_regex": (_never, _GUIDED),
    "guided_choice": (_never, _GUIDED),
    "guided_grammar": (_never, _GUIDED),
    "guided_decoding_backend": (_never, _GUIDED),
    "structured_outputs": (_never, _GUIDED),
    "metadata": (_always, ""),  # informational: tags for stored completions
    "service_tier": (_always, ""),
    "prompt_cache_key": (_always, ""),
    "safety_identifier": (_always, ""),
}


class FieldError(ValueError):
    """A request field moa serve refuses; ``param`` names it (OpenAI's error ``param``)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def check_fields(body: Any, honoured: Iterable[str], endpoint: str) -> Any:
    """Refuse the fields of a request body that moa serve would not honour.

    Args:
        body: The request body (a JSON object; anything else is left to the model's validation).
        honoured: The endpoint's request model's fields.
        endpoint: The route, for the message (``"/v1/completions"``).

    Returns:
        ``body`` without the inert fields (absent or at their neutral values).

    Raises:
        FieldError: an inert field at another value, or an unknown field.
    """
    if not isinstance(body, Mapping):
        return body
    honoured = set(honoured)
    kept = {}
    for name, value in body.items():
        if name in honoured:
            kept[name] = value
            continue
        if value is None:
            continue
        if name in INERT:
            accepts, why = INERT[name]
            if accepts(value):
                continue
            raise FieldError(f"{name}={_short(value)} is not supported by moa serve: {why}", name)
        raise FieldError(
            f"{name!r} is not a field moa serve takes on {endpoint}. It takes: {', '.join(sorted(honoured))} "
            f"(and OpenAI's or vLLM's other fields at their neutral values; {DOCS_PAGE} lists them). Drop it.",
            name)
    return kept


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
