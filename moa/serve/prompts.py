"""Prompt token ids of an OpenAI request, formatted as moa formats prompts everywhere else.

Chat messages go through the base tokenizer's chat template with the generation prompt,
then are tokenized without extra special tokens (the template already holds them): for one
user message this is exactly :func:`moa.data.chat.encode_prompts`, the formatting the
adapters and the gate were trained on and that ``moa generate`` and ``moa eval`` use. A
tokenizer without a template gets moa's fallback (:data:`moa.data.chat.FALLBACK_TEMPLATE`),
extended to several turns as ``"Role: content\\n"`` lines. A completion prompt is tokenized
as it is, with the tokenizer's special tokens (as vLLM does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moa.data.chat import FALLBACK_TEMPLATE, chat_prompt
from moa.serve.requests import BadRequestError


def _tokenizer(model: Any) -> Any:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise BadRequestError(
            "The served base has no tokenizer, so text prompts cannot be encoded. Send the prompt as "
            "token ids (a list of integers), or serve a base folder that includes tokenizer files."
        )
    return tokenizer


def chat_text(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The prompt text of a conversation, ending with the assistant's generation prompt.

    Args:
        tokenizer: The base's tokenizer.
        messages: ``[{"role", "content"}]``.
    """
    if len(messages) == 1 and messages[0]["role"] == "user" and set(messages[0]) == {"role", "content"}:
        return chat_prompt(tokenizer, messages[0]["content"])  # byte-identical to training / eval
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except Exception as error:  # noqa: BLE001 - jinja templates raise anything (role order rules...)
            raise BadRequestError(
                f"The base's chat template rejected these messages: {type(error).__name__}: {error}. "
                f"Check the roles and their order (roles: {[m['role'] for m in messages]})."
            ) from error
    head = FALLBACK_TEMPLATE.split("{prompt}")[0]  # "User: "
    assistant = FALLBACK_TEMPLATE.split("\n")[-1]  # "Assistant: "
    user_label = head.split(":")[0]
    lines = []
    for message in messages:
        role = user_label if message["role"] == "user" else message["role"].capitalize()
        lines.append(f"{role}: {message['content']}\n")
    return "".join(lines) + assistant


def chat_prompt_ids(model: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a conversation (template applied, no extra special tokens)."""
    tokenizer = _tokenizer(model)
    return list(tokenizer(chat_text(tokenizer, messages), add_special_tokens=False)["input_ids"])


def completion_prompt_ids(model: Any, text: str | None, token_ids: list[int] | None) -> list[int]:
    """Token ids of a completion prompt: given ids as they are (range-checked), text tokenized.

    Raises:
        BadRequestError: a token id outside the vocabulary, or no tokenizer for text.
    """
    if token_ids is not None:
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
        bad = [t for t in token_ids if t < 0 or (vocab and t >= vocab)]
        if bad:
            raise BadRequestError(f"Prompt token ids {bad[:5]} are outside the vocabulary 0..{vocab - 1}.")
        return list(token_ids)
    return list(_tokenizer(model)(text or "")["input_ids"])


def prompt_text(model: Any, token_ids: Sequence[int]) -> str:
    """A token-id prompt as text (what ``echo`` shows), special tokens included."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return ""
    return tokenizer.decode(list(token_ids), skip_special_tokens=False)
