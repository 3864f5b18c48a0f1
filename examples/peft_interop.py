"""PEFT adapters in and out: same files, same logits.

1. Make a LoRA adapter with ``peft`` and save it; load it in moa: same logits as PEFT.
2. Save an adapter from moa; load it with ``peft.PeftModel.from_pretrained``: same logits.

Run: ``python examples/peft_interop.py [--base default]`` (dense fp32 base, for exact logits)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import peft
import torch

import moa
from moa.model.base_loading import load_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="default")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        peft_model = peft.get_peft_model(
            load_base(args.base, quantization=None)[0],
            peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
        peft_model.save_pretrained(Path(tmp) / "from_peft")
        vocab = peft_model.config.vocab_size
        ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(0))
        model = moa.MixtureModel.from_pretrained(args.base, quantization=None)
        model.load_adapter(Path(tmp) / "from_peft", adapter_name="from_peft")
        with torch.no_grad():
            diff_in = (model(ids, adapter_names=["from_peft"] * 2).logits - peft_model.eval()(ids).logits).abs().max()
        print(f"PEFT -> moa: max |logit difference| = {diff_in:.2e}")

        torch.manual_seed(1)
        model.add_adapter("from_moa", moa.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
        model.save_adapter("from_moa", Path(tmp) / "from_moa")
        reloaded = peft.PeftModel.from_pretrained(load_base(args.base, quantization=None)[0], Path(tmp) / "from_moa")
        with torch.no_grad():
            diff_out = (model(ids, adapter_names=["from_moa"] * 2).logits - reloaded.eval()(ids).logits).abs().max()
        print(f"moa -> PEFT: max |logit difference| = {diff_out:.2e}")
        assert diff_in < 1e-4 and diff_out < 1e-4


if __name__ == "__main__":
    main()
