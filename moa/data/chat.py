"""Prompts as the model sees them: the chat template, padding and position ids.

Training (SFT), the gate's features, evaluation and the demo all format a request the
same way, so that what the gate and the adapters learn is what they see when serving:
the user message through ``tokenizer.apply_chat_template`` with the generation prompt,
tokenized without extra special tokens; the answer follows, then the end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: Used when a tokenizer has no chat template (tiny test tokenizers).
FALLBACK_TEMPLATE = "User: {prompt}\nAssistant: "


def ensure_pad_token(tokenizer: Any) -> None:
    """Give ``tokenizer`` a pad token (its EOS) if it has none."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """The text of one user turn plus the assistant's generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return FALLBACK_TEMPLATE.format(prompt=prompt)


def end_of_turn(tokenizer: Any) -> str:
    """The text that ends the assistant's answer (the EOS token, ``<|im_end|>`` for ChatML)."""
    return tokenizer.eos_token or ""


def encode_sft_example(
    tokenizer: Any, prompt: str, answer: str, max_length: int = 1024
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one training example (loss on the answer only).

    The prompt and the answer are tokenized separately, exactly as generation sees them
    (the model continues the prompt's tokens). Prompt positions get label ``-100``; the
    answer and its end-of-turn token keep their ids. Over-long examples lose the start of
    the prompt, never the answer.

    Returns:
        ``(input_ids, labels)``, equal length.
    """
    prompt_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + end_of_turn(tokenizer), add_special_tokens=False)["input_ids"]
    overflow = len(prompt_ids) + len(answer_ids) - max_length
    if overflow > 0:
        prompt_ids = prompt_ids[overflow:]
    return list(prompt_ids) + list(answer_ids), [-100] * len(prompt_ids) + list(answer_ids)


def pad_batch(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    labels: Sequence[Sequence[int]] | None = None,
    side: str = "right",
) -> dict[str, torch.Tensor]:
    """Pad token id lists into ``input_ids``, ``attention_mask`` (and ``labels``, -100 padded)."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    lab = torch.full((len(sequences), width), -100, dtype=torch.long) if labels is not None else None
    for i, seq in enumerate(sequences):
        n = len(seq)
        span = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, span] = torch.tensor(list(seq), dtype=torch.long)
        mask[i, span] = 1
        if lab is not None:
            lab[i, span] = torch.tensor(list(labels[i]), dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if lab is not None:
        out["labels"] = lab
    return out


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Chat-formatted, left-padded prompts ready for ``generate`` (``input_ids``, ``attention_mask``)."""
    ensure_pad_token(tokenizer)
    ids = [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    return pad_batch(ids, tokenizer.pad_token_id, side="left")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (what ``generate`` uses for left padding)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


def answer_token_budget(tokenizer: Any, answers: Sequence[str], margin: int = 4) -> int:
    """``max_new_tokens`` that fits every answer in ``answers`` plus its end-of-turn token."""
    longest = max((len(tokenizer(a + end_of_turn(tokenizer), add_special_tokens=False)["input_ids"])
                   for a in answers), default=16)
    return int(longest + margin)
