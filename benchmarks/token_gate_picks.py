"""Which adapter the per-token gate puts first on single-domain answers (a diagnostic).

For ``--items`` test items of each domain, one teacher-forced forward per batch, routed by the
per-token gate (``benchmarks/results/slots/token_gate_n256_seed0``). For every answer
position it records the adapter with the largest weight, and it reports, per domain, the
share of answer positions given to each adapter. It explains the single-domain losses that
``benchmarks/token_gate_single_domain.py`` measures. Writes
``benchmarks/results/token_gate_picks.json``.

Run: ``.venv/bin/python benchmarks/token_gate_picks.py [--items 32]``
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch

import moa
from moa.data import DOMAINS, load_split
from moa.eval.assets import load_adapters, shipped_adapters_dir
from moa.eval.slots import DecisionRecorder
from moa.eval.teacher_forced import make_batch, routed_rows, teacher_forced_exact
from moa.routing.learned_gate import LearnedGate

HERE = Path(__file__).resolve().parent
GATE = HERE / "results" / "slots" / "token_gate_n256_seed0"
RESULTS = HERE / "results" / "token_gate_picks.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=32, help="test items per domain")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = moa.MixtureModel.from_pretrained("default", quantization="nf4")
    load_adapters(model, shipped_adapters_dir())
    names = list(model.adapter_names)
    recorder = DecisionRecorder(LearnedGate.load(GATE))
    report = {}
    for domain in DOMAINS:
        examples = load_split(domain, "test")[: args.items]
        counts: collections.Counter[str] = collections.Counter()
        for start in range(0, len(examples), 16):
            chunk = examples[start:start + 16]
            recorder.calls.clear()
            teacher_forced_exact(model, chunk, routed_rows(recorder), batch_size=16)
            (rows, width), decision = recorder.calls[-1]
            top = decision.ids[torch.arange(decision.ids.shape[0]), decision.weights.argmax(-1)].reshape(rows, width)
            for r, item in enumerate(make_batch(model.tokenizer, chunk).items):
                for pos in range(item.prompt_length - 1, len(item.input_ids) - 1):
                    counts[names[int(top[r, pos])]] += 1
        total = sum(counts.values())
        report[domain] = {name: round(100 * counts[name] / total, 1) for name in names}
        print(f"{domain:<11} answer positions by the gate's first adapter: {report[domain]}", flush=True)
    RESULTS.write_text(json.dumps({"items_per_domain": args.items, "share_percent": report}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
