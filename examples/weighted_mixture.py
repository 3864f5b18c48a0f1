"""Weighted mixtures per row, in ``forward`` and in ``generate`` with the KV cache on.

Row 0 uses 70 % of one adapter and 30 % of another, row 1 a single adapter, row 2 the
base. The mixture is decided once per row and reused for every generated token. Each row is
then generated alone, with the same (left) padding it had in the batch, to show that
mixing adapters in one batch changes nothing for a row.

Run: ``python examples/weighted_mixture.py [--base default] [--quantization nf4|none]``
"""

from __future__ import annotations

import argparse

import torch

import moa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="default")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    model = moa.MixtureModel.from_pretrained(args.base, quantization=None if args.quantization == "none" else "nf4")
    for seed, name in enumerate(["formal", "casual"]):
        torch.manual_seed(seed)
        model.add_adapter(name, moa.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        with torch.no_grad():
            for layer in model.adapter_layers(name).values():
                layer.lora_B.weight.normal_(std=0.02)

    tokenizer = model.tokenizer
    prompts = ["Write a greeting.", "Describe the weather.", "Name a colour."]
    if tokenizer is not None:
        tokenizer.padding_side = "left"
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    else:  # a base without a tokenizer: random ids
        ids = torch.randint(0, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    mixtures = [{"formal": 0.7, "casual": 0.3}, {"casual": 1.0}, None]
    pad = tokenizer.pad_token_id if tokenizer is not None else 0
    out = model.generate(**batch, adapter_weights=mixtures, max_new_tokens=args.max_new_tokens,
                         do_sample=False, pad_token_id=pad)
    prompt_len = batch["input_ids"].shape[1]

    def answer(tokens: torch.Tensor) -> str | list[int]:
        # a row that stops early (EOS) is padded inside the batch: compare answers, not lengths
        if tokenizer is not None:
            return tokenizer.decode(tokens, skip_special_tokens=True)
        return tokens.tolist()

    for i, mixture in enumerate(mixtures):
        alone = model.generate(**{k: v[i : i + 1] for k, v in batch.items()}, adapter_weights=[mixture],
                               max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad)
        text, text_alone = answer(out[i, prompt_len:]), answer(alone[0, prompt_len:])
        same = text == text_alone
        print(f"row {i} mixture={mixture} same as alone (same padding): {same} -> {text!r}")
        assert same, "generation in the mixed batch differs from the row alone"

if __name__ == "__main__":
    main()
