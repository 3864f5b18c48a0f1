"""Single-domain test scores with the per-token gate in place of the sequence gate.

Issue 13 asks that the five domains' test scores stay within 1 point when the per-token gate
(``benchmarks/results/slots/token_gate_n256_seed0``) replaces today's sequence gate. The
sequence gate routes 100 % of these prompts to their own domain's adapter (``moa demo``,
``moa eval``), so today's score is that adapter's score. Both are measured here with the
same scorer: teacher-forced exact match (``moa.eval.teacher_forced``: greedy decoding writes
the gold answer iff every answer position's argmax is the gold token), on every test item of
every domain, NF4 default base. A paired bootstrap gives the 95 % interval of each
difference.

Run: ``.venv/bin/python benchmarks/token_gate_single_domain.py [--limit N] [--gate FOLDER --out JSON]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import moa
from moa.data import DOMAINS, load_split
from moa.eval.assets import load_adapters, shipped_adapters_dir
from moa.eval.slots import paired_bootstrap
from moa.eval.teacher_forced import explicit_rows, routed_rows, teacher_forced_exact
from moa.routing.learned_gate import LearnedGate

HERE = Path(__file__).resolve().parent
GATE = HERE / "results" / "slots" / "token_gate_n256_seed0"
RESULTS = HERE / "results" / "token_gate_single_domain.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="test items per domain (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gate", type=Path, default=GATE, help="the per-token gate folder")
    parser.add_argument("--out", type=Path, default=RESULTS, help="result JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = moa.MixtureModel.from_pretrained("default", quantization="nf4")
    load_adapters(model, shipped_adapters_dir())
    token_gate = LearnedGate.load(args.gate)
    report: dict[str, dict] = {}
    for domain in DOMAINS:
        examples = load_split(domain, "test")[: args.limit]
        own = teacher_forced_exact(model, examples, explicit_rows(domain), progress=True, desc=f"{domain} adapter")
        gated = teacher_forced_exact(model, examples, routed_rows(token_gate), progress=True,
                                     desc=f"{domain} token gate")
        mean, low, high = paired_bootstrap(gated, own)
        report[domain] = {"items": len(examples), "own_adapter": round(100 * sum(own) / len(own), 1),
                          "token_gate": round(100 * sum(gated) / len(gated), 1),
                          "token_gate_minus_own": [round(100 * v, 1) for v in (mean, low, high)]}
        print(domain, json.dumps(report[domain]), flush=True)
    args.out.write_text(json.dumps({"scorer": "teacher-forced exact", "precision": "nf4",
                                    "gate": str(args.gate.relative_to(HERE.parent) if args.gate.is_absolute() else args.gate),
                                    "domains": report}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
