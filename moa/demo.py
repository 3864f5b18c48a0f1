"""``moa demo``: five domain adapters over one NF4 base, routed per request by a learned gate.

On a fresh machine (no network, 2 CPU cores, a few minutes):

1. load the default base (SmolLM2-135M-Instruct) quantized to NF4;
2. load the five shipped domain adapters (``moa/demo_adapters``; ``--retrain`` trains them
   again with the committed recipe, which takes hours on a CPU);
3. train the learned gate on the domain labels (cached hidden states of layer 2 of the
   train prompts: seconds);
4. evaluate on a quick subset of every test set: base, oracle routing, the gate
   (``--full``: the whole evaluation of ``moa eval``, all configurations and test items);
5. serve ONE mixed batch, one request per domain plus a composite one, in one ``generate``
   call: the gate routes each row from its own prompt inside the same forward; print each
   request, the chosen adapter weights, the answer, whether it is correct, and whether the
   row's answer is the same when it is served alone;
6. answer one composite request (a Python function returning French number words) with the
   shipped per-token gate (``moa/demo_adapters/token_router``), which decides every generated
   token in the same pass: print which adapter wrote each part of the answer, and whether the
   answer is exact (see docs/mixing.md for how often it is).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

STAGES = ("load NF4 base", "load adapters", "train gate", "quick eval", "mixed batch", "per-token switch")
TOKEN_ROUTER_DIRNAME = "token_router"
SWITCH_TASK = "code_french"


def _weights_text(mixture: dict[str, float] | None) -> str:
    if not mixture:
        return "base"
    return " + ".join(f"{w:.2f} {n}" for n, w in sorted(mixture.items(), key=lambda kv: -kv[1]) if w >= 0.005)


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def pick_showcase(domains: list[str]) -> list[Any]:
    """One test request per domain (a held-out phrasing where there is one) and one composite."""
    from moa.data import HELD_OUT_PHRASINGS, load_composite, load_split

    picked = []
    for d in domains:
        test = load_split(d, "test")
        held = [e for e in test if e.phrasing in HELD_OUT_PHRASINGS[d]]
        picked.append((held or test)[0])
    composite = load_composite()
    if composite:
        picked.append(composite[0])
    return picked


def switch_showcase(model: Any, adapters_dir: Path, max_new_tokens: int = 48) -> list[str]:
    """Lines showing the per-token gate answer the first test request of :data:`SWITCH_TASK`.

    Empty when ``adapters_dir`` has no token router (custom adapters).
    """
    from moa.data import load_slots
    from moa.eval.switching import segments, trace_generation
    from moa.routing.learned_gate import LearnedGate

    folder = adapters_dir / TOKEN_ROUTER_DIRNAME
    if not folder.is_dir():
        return [f"(no per-token gate in {adapters_dir}: the per-token switch is skipped)"]
    gate = LearnedGate.load(folder)
    example = next(e for e in load_slots("test") if e.meta["task"] == SWITCH_TASK)
    traced = trace_generation(model, example.prompt, gate, max_new_tokens)
    answer = "".join(t.text for t in traced)
    lines = [f"One composite request, per-token gate ({folder}, top-{gate.top_k}, "
             f"{sum(p.numel() for p in gate.head.parameters())} parameters), every generated token decided in-pass:",
             "", f"request: {example.prompt}", f"gold:    {example.answer!r}",
             f"answer:  {answer!r} ({'exact' if answer == example.answer else 'not exact'})", "",
             "who wrote it (top adapter per token, consecutive tokens joined):"]
    lines += [f"  {adapter or 'base':<11} {text!r}" for text, adapter in segments(traced)]
    return lines


def _retrain(model: Any, out: Path) -> None:
    from moa.data import DOMAINS
    from moa.train.recipes import train_domain_adapter

    logger.warning("--retrain: training %d adapters with the demo recipe into %s (hours on a CPU).", len(DOMAINS), out)
    for domain in DOMAINS:
        train_domain_adapter(model, domain, out / domain)
        model.delete_adapter(domain)


def run_demo(
    base: str = "default",
    quantization: str | None = "nf4",
    full: bool = False,
    retrain: bool = False,
    adapters_dir: str | None = None,
    out_dir: str | None = None,
    limit: int = 8,
    gate_examples_per_domain: int = 40,
    check_alone: bool = True,
) -> str:
    """Run the demo and return its report.

    Args:
        base: Base model (``"default"``, a folder, a Hub id).
        quantization: ``"nf4"`` or ``None``.
        full: Run the full evaluation (every configuration, every test item, composite).
        retrain: Train the five adapters again (into ``out_dir/adapters``) instead of loading
            the shipped ones.
        adapters_dir: Use these adapters instead of the shipped ones.
        out_dir: Where ``--full`` writes its report (and ``--retrain`` its adapters).
        limit: Test items per domain in the quick evaluation.
        gate_examples_per_domain: Train prompts per domain the gate learns from.
        check_alone: Also serve every showcase row alone and compare.
    """
    import moa
    from moa.data import DOMAINS, load_composite, load_split
    from moa.eval import EvalConfig, evaluate, render_markdown, write_report
    from moa.eval.assets import load_adapters, shipped_adapters_dir
    from moa.eval.runner import generate_routed, score_examples
    from moa.data.chat import answer_token_budget
    from moa.train.recipes import DEMO_RECIPE
    from moa.train.router import train_router

    start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(out_dir or "demo_results")
    bar = tqdm(total=len(STAGES), desc="moa demo", unit="stage")

    def stage(name: str) -> None:
        bar.set_postfix_str(name)

    def done(name: str, since: float) -> None:
        timings[name] = time.perf_counter() - since
        bar.update()

    t = time.perf_counter()
    stage(STAGES[0])
    model = moa.MixtureModel.from_pretrained(base, quantization=quantization)
    done(STAGES[0], t)

    t = time.perf_counter()
    stage(STAGES[1])
    source = Path(adapters_dir) if adapters_dir else shipped_adapters_dir()
    if retrain:
        source = out / "adapters"
        _retrain(model, source)
    names = load_adapters(model, source)
    domains = [d for d in DOMAINS if d in names]
    done(STAGES[1], t)

    t = time.perf_counter()
    stage(STAGES[2])
    train = [e for d in domains for e in load_split(d, "train")[:gate_examples_per_domain]]
    dev = [e for d in domains for e in load_split(d, "dev")[:20]]
    gate, gate_metrics = train_router(model, train, domains, hidden_layer=DEMO_RECIPE.first_layer,
                                      dev_examples=dev, progress=False)
    done(STAGES[2], t)

    t = time.perf_counter()
    stage(STAGES[3])
    examples = {d: load_split(d, "test") for d in domains}
    budgets = {d: answer_token_budget(model.tokenizer, [e.answer for e in load_split(d, "train")]) for d in domains}
    if full:
        config = EvalConfig(batch_size=32)
        result = evaluate(model, examples, domains, gate=gate, composite=load_composite(), config=config,
                          budgets=budgets)
        write_report(result, out / "eval")
    else:
        config = EvalConfig(limit=limit, batch_size=32, configs=("base", "oracle", "gate"), composite=False)
        result = evaluate(model, examples, domains, gate=gate, config=config, budgets=budgets)
    done(STAGES[3], t)

    t = time.perf_counter()
    stage(STAGES[4])
    showcase = pick_showcase(domains)
    budget = max(budgets.values())
    prompts = [e.prompt for e in showcase]
    batch_start = time.perf_counter()
    answers, routing = generate_routed(model, prompts, gate, budget, batch_size=len(prompts), progress=False)
    batch_seconds = time.perf_counter() - batch_start
    correct = score_examples(showcase, answers)
    alone = [generate_routed(model, [p], gate, budget, progress=False)[0][0] for p in prompts] if check_alone else []
    done(STAGES[4], t)

    t = time.perf_counter()
    stage(STAGES[5])
    switch_lines = switch_showcase(model, source)
    done(STAGES[5], t)
    bar.close()

    quant = quantization or "dense"
    lines = [
        f"moa demo: base {base!r} ({quant}); adapters {domains} from {source}; learned gate on the input of "
        f"decoder layer {gate.hidden_layer} (top-{gate.top_k}), trained in {gate_metrics['seconds'] + gate_metrics['feature_seconds']:.1f} s "
        f"on {len(train)} prompts, dev routing accuracy {100 * gate_metrics.get('dev_accuracy', float('nan')):.1f} %",
        "",
        f"One mixed batch: {len(prompts)} requests, ONE generate call ({batch_seconds:.1f} s), each row routed in-pass "
        f"from its own prompt, KV cache on, greedy, max_new_tokens={budget}",
        "",
        f"{'domain':<11} {'request':<52} {'gate weights':<26} {'ok':<3} "
        + ("alone " if check_alone else "") + "answer",
        "-" * 150,
    ]
    for i, e in enumerate(showcase):
        same = ("same  " if alone[i] == answers[i] else "DIFF  ") if check_alone else ""
        lines.append(f"{e.domain:<11} {_clip(e.prompt, 51):<52} {_clip(_weights_text(routing[i]), 25):<26} "
                     f"{'✓' if correct[i] else '✗':<3} {same}{_clip(answers[i], 60)}")
    lines += ["", *switch_lines]
    lines += ["", "Quick evaluation" + (" (full test sets)" if full else f" ({limit} test items per domain)") + ":", ""]
    lines.append(render_markdown(result))
    if full:
        lines.append(f"Full report written to {out / 'eval'} (eval.md, eval.json, PNG plots).")
    lines.append("Stage timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
                 + f"; whole demo {time.perf_counter() - start:.1f} s (torch threads {torch.get_num_threads()}).")
    return "\n".join(lines)
