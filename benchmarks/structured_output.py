"""What structured output (``response_format`` json_schema) costs per step, per constrained row.

On the default base (SmolLM2-135M-Instruct, fp32, 49,152-token vocabulary):

1. **The guided-decoding libraries**, on the base's tokenizer: llguidance (what moa serve uses)
   and, when it is importable, outlines-core (not in moa's lock; install it beside to compare).
   Per library: the tokenizer/vocabulary build (once per server), the grammar compile (once
   per request), and the per-step cost of one row: computing its allowed-token mask, turning it
   into a boolean mask of the logits, and advancing by the token (medians and p90 over a valid
   answer's tokens, several schemas).
2. **The engine**: a batch of ``--batch`` rows through :class:`moa.serve.engine.Engine`, all free
   (greedy), then half free and half constrained to a schema, ``--tokens`` steps each, the two
   interleaved for ``--rounds`` rounds: the median decode step time of each (the engine's busy
   time over its steps), and the time spent in the constrained rows' masks and advances, per
   constrained row and step (timed around :class:`moa.serve.structured.Guide`).
3. **Validity**: ``--prompts`` chat prompts constrained to the schema in one batch with free rows:
   how many answers parse and validate (jsonschema), and whether the free rows' answers equal
   the same requests served alone.

Writes ``benchmarks/results/structured_output.json``.

Run: ``.venv/bin/python benchmarks/structured_output.py [--batch 8] [--prompts 20] [--threads 2]``
(with outlines-core: ``PYTHONPATH=<folder holding outlines_core> .venv/bin/python ...``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import torch

import moa
from moa.serve.engine import Engine
from moa.serve.logprobs import byte_alphabet
from moa.serve.prompts import chat_prompt_ids
from moa.serve.requests import GenerationRequest, RowRouting, SamplingParams
from moa.serve.rows import eos_ids
from moa.serve.structured import JSON_DEFAULTS, Guide, StructuredOutput

OUT = Path(__file__).resolve().parent / "results" / "structured_output.json"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 18, "maximum": 90},
        "city": {"type": "string", "enum": ["Paris", "Berlin", "Rome", "Madrid"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}},
            "required": ["sku", "quantity"], "additionalProperties": False}},
        "note": {"type": "string"},
    },
    "required": ["items", "note"],
    "additionalProperties": False,
}
SCHEMAS = {
    "person": (PERSON, {"name": "Ada Lovelace", "age": 36, "city": "Paris"}),
    "order": (ORDER, {"items": [{"sku": "A-12", "quantity": 2}, {"sku": "B 7", "quantity": 10}],
                      "note": "leave at the door, thanks"}),
}
TOPICS = ["a baker", "a pilot", "a nurse", "a farmer", "a painter", "a student", "a chef", "a teacher",
          "a doctor", "a singer", "a poet", "a judge", "a sailor", "a miner", "a tailor", "a writer",
          "a dancer", "a driver", "a banker", "a gardener"]
FREE = ["What is the capital of France?", "Name three colors.", "Say hello in Spanish.", "What is 2 + 2?"]


def summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {"median_ms": round(1e3 * statistics.median(ordered), 4),
            "p90_ms": round(1e3 * ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)], 4),
            "mean_ms": round(1e3 * statistics.fmean(ordered), 4), "n": len(ordered)}


def unpack(words: np.ndarray, vocab: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab].astype(bool))


def compare_libraries(tokenizer: Any, vocab: int, eos: list[int], rounds: int) -> dict[str, Any]:
    """Tokenizer build, compile and per-step mask cost of llguidance and (if present) outlines-core."""
    import llguidance
    import llguidance.hf
    import llguidance.numpy

    out: dict[str, Any] = {}
    start = time.perf_counter()
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)
    ll: dict[str, Any] = {"version": importlib.metadata.version("llguidance"),
                          "tokenizer_build_s": round(time.perf_counter() - start, 4)}
    for name, (schema, answer) in SCHEMAS.items():
        ids = tokenizer(json.dumps(answer, separators=(",", ":")), add_special_tokens=False)["input_ids"]
        compile_s, step_s = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=dict(JSON_DEFAULTS))
            matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
            compile_s.append(time.perf_counter() - start)
            bits = llguidance.numpy.allocate_token_bitmask(1, vocab)
            for token in ids:
                start = time.perf_counter()
                llguidance.numpy.fill_next_token_bitmask(matcher, bits, 0)
                allowed = unpack(bits[0], vocab)
                ok = matcher.consume_token(token)
                step_s.append(time.perf_counter() - start)
                assert ok and bool(allowed[token]), (name, token)
        ll[name] = {"answer_tokens": len(ids), "compile": summary(compile_s), "step": summary(step_s)}
    ll["json_object_compiles"] = not llguidance.LLMatcher(
        ll_tokenizer, llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})).is_error()
    out["llguidance"] = ll
    try:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema
        from outlines_core.kernels.torch import allocate_token_bitmask, fill_next_token_bitmask
    except ImportError:
        out["outlines_core"] = "not installed (not in moa's lock); see the module docstring to compare"
        return out
    start = time.perf_counter()
    byte_of = byte_alphabet()
    vocabulary: dict[bytes, list[int]] = {}
    for piece, token in tokenizer.get_vocab().items():
        if token in eos or token in tokenizer.all_special_ids:
            continue
        if all(ch in byte_of for ch in piece):
            vocabulary.setdefault(bytes(byte_of[ch] for ch in piece), []).append(token)
    oc_vocabulary = outlines_core.Vocabulary(eos[0], vocabulary)
    oc: dict[str, Any] = {"version": importlib.metadata.version("outlines_core"),
                          "tokenizer_build_s": round(time.perf_counter() - start, 4)}
    for name, (schema, answer) in SCHEMAS.items():
        ids = tokenizer(json.dumps(answer, separators=(",", ":")), add_special_tokens=False)["input_ids"]
        compile_s, step_s = [], []
        for _ in range(max(1, rounds // 2)):
            start = time.perf_counter()
            guide = outlines_core.Guide(outlines_core.Index(build_regex_from_schema(json.dumps(schema)),
                                                            oc_vocabulary))
            compile_s.append(time.perf_counter() - start)
            bits = allocate_token_bitmask(vocab)
            for token in ids:
                start = time.perf_counter()
                fill_next_token_bitmask(guide, bits)
                allowed = unpack(bits.view(-1).numpy(), vocab)
                guide.advance(token)
                step_s.append(time.perf_counter() - start)
                assert bool(allowed[token]), (name, token)
        oc[name] = {"answer_tokens": len(ids), "compile": summary(compile_s), "step": summary(step_s)}
    oc["json_object_compiles"] = "no: outlines-core builds regular expressions, and any JSON object is recursive"
    out["outlines_core"] = oc
    return out


class GuideTimer:
    """Times every :meth:`Guide.mask` and :meth:`Guide.advance` (the constrained rows' extra work)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._mask, self._advance = Guide.mask, Guide.advance

    def __enter__(self) -> GuideTimer:
        timer = self

        def mask(guide: Guide, logits: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            try:
                return timer._mask(guide, logits)
            finally:
                timer.seconds.append(time.perf_counter() - start)

        def advance(guide: Guide, token: int) -> None:
            start = time.perf_counter()
            try:
                timer._advance(guide, token)
            finally:
                timer.seconds[-1] += time.perf_counter() - start  # one mask, then one advance, per step

        Guide.mask, Guide.advance = mask, advance  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        Guide.mask, Guide.advance = self._mask, self._advance  # type: ignore[method-assign]


def chat_request(model: Any, rid: str, text: str, max_tokens: int, guide: Guide | None = None,
                 min_tokens: int = 0) -> GenerationRequest:
    ids = chat_prompt_ids(model, [{"role": "user", "content": text}])
    params = SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens, temperature=0)
    return GenerationRequest(rid, ids, RowRouting(), params, guide=guide)


def run_batch(engine: Engine, requests: list[GenerationRequest]) -> tuple[list[Any], float, int]:
    """Serve ``requests`` admitted together; their completions, busy seconds and decode steps."""
    before = engine.stats()
    # hold the engine thread in an admin call while submitting, so the requests are admitted together
    entered, done = threading.Event(), threading.Event()
    holder = threading.Thread(target=engine.call, args=(lambda: (entered.set(), done.wait(60)),), daemon=True)
    holder.start()
    entered.wait(60)
    handles = [engine.submit(r) for r in requests]
    done.set()
    holder.join(60)
    completions = [h.wait(1200) for h in handles]
    after = engine.stats()
    return completions, after["busy_seconds"] - before["busy_seconds"], int(after["steps"] - before["steps"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()  # other processes' load slows OpenMP's barriers a lot: recorded
    model = moa.MixtureModel.from_pretrained("default", quantization="none")
    vocab, eos = int(model.config.vocab_size), sorted(eos_ids(model))
    results: dict[str, Any] = {"libraries": compare_libraries(model.tokenizer, vocab, eos, args.rounds)}
    print(json.dumps(results["libraries"], indent=1))

    outputs = StructuredOutput(model.tokenizer, vocab, eos)
    grammar = outputs.grammar({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    engine = Engine(model, max_batch_size=max(args.batch, args.prompts + len(FREE)))
    engine.start()
    try:
        half = args.batch // 2
        # min_tokens: no EOS, so every free row runs all its steps; the constrained rows stop at
        # --tokens too (their JSON is longer), so both batches keep all their rows every step
        free = [chat_request(model, f"free{i}", FREE[i % len(FREE)], args.tokens, min_tokens=args.tokens)
                for i in range(args.batch)]
        run_batch(engine, free[:2])  # warm-up
        steps: dict[str, list[float]] = {"free": [], "mixed": []}
        lengths: list[int] = []
        with GuideTimer() as timer:
            for _ in range(args.rounds):  # interleaved: a busy machine slows both alike
                _, busy, count = run_batch(engine, free)
                steps["free"].append(busy / count)
                constrained = [chat_request(model, f"json{i}", f"Describe {TOPICS[i % len(TOPICS)]} as JSON.",
                                            args.tokens, outputs.guide(grammar)) for i in range(half)]
                done, busy, count = run_batch(engine, free[:args.batch - half] + constrained)
                steps["mixed"].append(busy / count)
                lengths += [c.completion_tokens for c in done[args.batch - half:]]
        free_step = statistics.median(steps["free"])
        results["engine"] = {
            "batch": args.batch, "constrained_rows": half, "tokens_per_row": args.tokens, "rounds": args.rounds,
            "constrained_tokens": sorted(set(lengths)),
            "step_all_free_ms_median": round(1e3 * free_step, 3),
            "step_half_constrained_ms_median": round(1e3 * statistics.median(steps["mixed"]), 3),
            "guide_per_constrained_row_step": summary(timer.seconds),
            "guide_median_share_of_free_step": round(statistics.median(timer.seconds) / free_step, 5),
        }
        print(json.dumps(results["engine"], indent=1))

        prompts = [f"Describe {TOPICS[i % len(TOPICS)]} as JSON with a name, an age and a city."
                   for i in range(args.prompts)]
        constrained = [chat_request(model, f"p{i}", p, 48, outputs.guide(grammar)) for i, p in enumerate(prompts)]
        free_rows = [chat_request(model, f"f{i}", text, 12) for i, text in enumerate(FREE)]
        together, _, _ = run_batch(engine, free_rows + constrained)
        alone = [engine.submit(r).wait(600).text for r in free_rows]
        valid = 0
        for completion in together[len(FREE):]:
            try:
                jsonschema.validate(json.loads(completion.text), PERSON)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
        results["validity"] = {
            "prompts": args.prompts, "valid": valid, "max_tokens": 48,
            "answer_tokens": [c.completion_tokens for c in together[len(FREE):]],
            "examples": [c.text for c in together[len(FREE):len(FREE) + 3]],
            "free_rows": len(FREE),
            "free_rows_equal_alone": sum(c.text == a for c, a in zip(together[:len(FREE)], alone, strict=True)),
        }
        print(json.dumps(results["validity"], indent=1))
    finally:
        engine.shutdown()
    results.update({"threads": args.threads, "precision": "fp32", "vocab": vocab,
                    "base": "default (SmolLM2-135M-Instruct)", "torch": torch.__version__,
                    "machine": platform.machine(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_average_1min": [round(load_before[0], 2),
                                                                 round(os.getloadavg()[0], 2)]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
