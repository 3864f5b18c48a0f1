"""Run the evaluation: every domain under base, each adapter, oracle, the gate, uniform.

Every configuration is a routing per row, so one ``generate`` call serves rows of
different configurations and domains at once (mixed batches are the point of moa):
explicit rows (base, one adapter, a uniform mixture) share batches; the gate's rows run
in their own batches (each row routed in-pass from its own prompt). Greedy decoding; each
row is cut at its domain's token budget (``max_new_tokens`` sized per domain from the
answers) and at the end-of-turn token.

The oracle routes each request to its own domain's adapter; its generations are exactly
the diagonal of the domain x adapter matrix, so they are not run twice.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from moa.routing.decision import Mixture
from moa.routing.router import Router, RoutingRequest
from moa.data.chat import answer_token_budget, chat_prompt, ensure_pad_token, pad_batch
from moa.model.limits import context_length

logger = logging.getLogger(__name__)

ROUTER = "__router__"  # a job routed by the model's router
CONFIG_ORDER = ("base", "oracle", "gate", "uniform")


@dataclasses.dataclass
class Job:
    """One generation: an example under one configuration."""

    config: str
    example: Any
    route: Mixture | str
    budget: int
    prompt_len: int = 0
    prediction: str = ""
    correct: bool = False
    routing: dict[str, float] | None = None


class RecordingRouter(Router):
    """Wraps a router and keeps every decision it makes, as ``{name: weight}`` per row."""

    def __init__(self, inner: Router) -> None:
        self.inner = inner
        self.name = inner.name
        self.level = inner.level
        self.hidden_layer = inner.hidden_layer
        self.decisions: list[list[dict[str, float]]] = []

    def route(self, request: RoutingRequest) -> Any:
        decision = self.inner.route(request)
        rows = decision.to_mixtures(request.adapter_names)
        if decision.level == "token":
            batch = int(request.hidden_states.shape[0]) if request.hidden_states is not None else 1
            per_row = len(rows) // max(1, batch)
            rows = [_average(rows[b * per_row:(b + 1) * per_row]) for b in range(batch)]
        self.decisions.append(rows)
        return decision


def _average(mixtures: Sequence[Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = defaultdict(float)
    for mix in mixtures:
        for name, weight in mix.items():
            total[name] += weight / max(1, len(mixtures))
    return dict(total)


def score_examples(examples: Sequence[Any], predictions: Sequence[str]) -> list[bool]:
    """``moa.data.score`` per example (exact match for objects the data package does not know)."""
    try:
        from moa.data import COMPOSITE, DOMAINS, score
        known = {*DOMAINS, COMPOSITE}
    except ImportError:  # pragma: no cover - the data package ships with moa
        score, known = None, set()
    out = []
    for example, prediction in zip(examples, predictions, strict=True):
        if score is not None and getattr(example, "domain", None) in known:
            out.append(bool(score(example, prediction)))
        else:
            out.append(prediction.strip() == str(example.answer).strip())
    return out


def decode_new_tokens(tokenizer: Any, tokens: torch.Tensor, budget: int) -> str:
    """The answer text of one row: at most ``budget`` tokens, cut at end-of-turn/EOS."""
    ids = tokens[:budget].tolist()
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    for i, t in enumerate(ids):
        if t in stop:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate_answers(
    model: Any,
    prompts: Sequence[str],
    routes: Sequence[Mixture] | None,
    max_new_tokens: int | Sequence[int],
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Greedy answers of ``prompts``, one generate call per batch.

    Args:
        model: A :class:`moa.MixtureModel`.
        prompts: User messages (the chat template is applied).
        routes: One mixture per prompt (``None`` = base), or ``None`` to let the model's
            router decide every row.
        max_new_tokens: One budget for all, or one per prompt.
        batch_size: Rows per generate call.
        progress: Show a tqdm bar.
        desc: The bar's label.
    """
    budgets = [int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    jobs = [Job("", None, ROUTER if routes is None else routes[i], budgets[i]) for i in range(len(prompts))]
    _run_jobs(model, jobs, list(prompts), batch_size, progress, desc)
    return [j.prediction for j in jobs]


def generate_routed(
    model: Any,
    prompts: Sequence[str],
    router: Router,
    max_new_tokens: int | Sequence[int],
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "generate (routed)",
) -> tuple[list[str], list[dict[str, float] | None]]:
    """Greedy answers with ``router`` deciding every row in-pass, and each row's decision.

    The model's previous router is restored afterwards.

    Returns:
        ``(answers, routing)``: per prompt, the answer and the ``{adapter: weight}`` the
        router chose for it (averaged over the prompt's tokens for token-level routers).
    """
    budgets = [int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    jobs = [Job("", None, ROUTER, budgets[i]) for i in range(len(prompts))]
    recorder = RecordingRouter(router)
    previous = model.router
    model.set_router(recorder)
    try:
        _run_jobs(model, jobs, list(prompts), batch_size, progress, desc, recorder)
    finally:
        model.set_router(previous)
    return [j.prediction for j in jobs], [j.routing for j in jobs]


def _run_jobs(
    model: Any,
    jobs: list[Job],
    prompts: list[str],
    batch_size: int,
    progress: bool,
    desc: str,
    recorder: RecordingRouter | None = None,
) -> None:
    """Generate every job in place (``job.prediction``), batched, longest prompts first."""
    tokenizer = model.tokenizer
    ensure_pad_token(tokenizer)
    cache: dict[str, list[int]] = {}
    for p in prompts:
        if p not in cache:
            cache[p] = tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
    for job, p in zip(jobs, prompts, strict=True):
        job.prompt_len = len(cache[p])
    # Routed rows get their own batches; base rows (which rarely stop early) are kept
    # together so that adapter rows, which stop at their end-of-turn, finish their batches sooner.
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i].route == ROUTER, -jobs[i].budget,
                                                    jobs[i].route is None, -jobs[i].prompt_len))
    batches: list[list[int]] = []
    for i in order:
        same_kind = batches and (jobs[batches[-1][0]].route == ROUTER) == (jobs[i].route == ROUTER)
        if same_kind and len(batches[-1]) < batch_size:
            batches[-1].append(i)
        else:
            batches.append([i])
    bar = tqdm(total=len(jobs), desc=desc, unit="req", disable=not progress)
    context = context_length(model.config)
    for batch in batches:
        inputs = pad_batch([cache[prompts[i]] for i in batch], tokenizer.pad_token_id, side="left")
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        routed = jobs[batch[0]].route == ROUTER
        # A budget never runs past the base's context (generate refuses that up front).
        room = context - inputs["input_ids"].shape[1] if context else None
        new_tokens = max(jobs[i].budget for i in batch)
        kwargs: dict[str, Any] = dict(max_new_tokens=new_tokens if room is None else max(1, min(new_tokens, room)),
                                      do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        if not routed:
            kwargs["adapter_weights"] = [jobs[i].route for i in batch]
        seen = len(recorder.decisions) if recorder is not None else 0
        with torch.no_grad():
            out = model.generate(**inputs, **kwargs)
        width = inputs["input_ids"].shape[1]
        for row, i in enumerate(batch):
            jobs[i].prediction = decode_new_tokens(tokenizer, out[row, width:], jobs[i].budget)
            if routed and recorder is not None and len(recorder.decisions) > seen:
                jobs[i].routing = recorder.decisions[seen][row]
        bar.update(len(batch))
    bar.close()


@dataclasses.dataclass
class EvalConfig:
    """What to evaluate.

    Attributes:
        limit: Test examples per domain (``None`` = all).
        matrix_limit: Off-diagonal cells of the domain x adapter matrix (adapter ``a`` on
            domain ``d != a``) run on only the first ``matrix_limit`` examples of each domain
            (``None`` = all). They only show how little an adapter transfers, and they are
            4/5 of a full evaluation's generations; the diagonal (= oracle) always runs on all.
        batch_size: Rows per generate call.
        configs: Any of ``base``, ``matrix`` (each adapter on each domain), ``oracle``,
            ``gate``, ``uniform``. ``oracle`` reuses the matrix's diagonal when both run.
        composite: Also evaluate the composite prompts.
        progress: Progress bars.
    """

    limit: int | None = None
    matrix_limit: int | None = None
    batch_size: int = 16
    configs: tuple[str, ...] = ("base", "matrix", "oracle", "gate", "uniform")
    composite: bool = True
    progress: bool = True


def evaluate(
    model: Any,
    examples: Mapping[str, Sequence[Any]],
    adapters: Sequence[str],
    gate: Router | None = None,
    composite: Sequence[Any] = (),
    config: EvalConfig | None = None,
    budgets: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Evaluate and return the JSON-ready result (see :mod:`moa.eval.report`).

    Args:
        model: A :class:`moa.MixtureModel` with ``adapters`` loaded (named by domain).
        examples: Test examples per domain.
        adapters: The domain adapters (the oracle sends domain ``d`` to adapter ``d``).
        gate: The learned gate (or any router); skipped if ``None``.
        composite: Prompts no single adapter covers, reported separately.
        config: What to run.
        budgets: ``max_new_tokens`` per domain (default: from the answers of the examples
            evaluated; ``moa eval`` sizes them from the train split's answers).
    """
    config = config or EvalConfig()
    domains = list(examples)
    tokenizer = model.tokenizer
    picked = {d: list(examples[d])[: config.limit] if config.limit else list(examples[d]) for d in domains}
    budgets = dict(budgets or {})
    for d in domains:
        budgets.setdefault(d, answer_token_budget(tokenizer, [e.answer for e in picked[d]]))
    comp = list(composite)
    comp_budget = answer_token_budget(tokenizer, [e.answer for e in comp]) if comp else 0
    uniform = {a: 1.0 / len(adapters) for a in adapters}
    run = set(config.configs)
    explicit: list[Job] = []
    routed: list[Job] = []
    for d in domains:
        for i, e in enumerate(picked[d]):
            if "base" in run:
                explicit.append(Job("base", e, None, budgets[d]))
            if "matrix" in run:
                off_diagonal = config.matrix_limit is None or i < config.matrix_limit
                explicit += [Job(f"adapter:{a}", e, {a: 1.0}, budgets[d]) for a in adapters
                             if a == d or off_diagonal]
            elif "oracle" in run and d in adapters:
                explicit.append(Job("oracle", e, {d: 1.0}, budgets[d]))
            if "uniform" in run:
                explicit.append(Job("uniform", e, uniform, budgets[d]))
            if "gate" in run and gate is not None:
                routed.append(Job("gate", e, ROUTER, budgets[d]))
    if config.composite:
        for e in comp:
            explicit += [Job("base", e, None, comp_budget), Job("uniform", e, uniform, comp_budget)]
            explicit += [Job(f"adapter:{a}", e, {a: 1.0}, comp_budget) for a in adapters]
            meta = getattr(e, "meta", None) or {}
            pair = [d for d in meta.get("combines", meta.get("domains", [])) if d in adapters]
            if len(pair) > 1:
                explicit.append(Job("pair_mixture", e, {d: 1.0 / len(pair) for d in pair}, comp_budget))
            if gate is not None:
                routed.append(Job("gate", e, ROUTER, comp_budget))
    timings: dict[str, float] = {}
    start = time.perf_counter()
    _run_jobs(model, explicit, [j.example.prompt for j in explicit], config.batch_size, config.progress,
              "eval: base/adapters/uniform (mixed batches)")
    timings["explicit_seconds"] = time.perf_counter() - start
    recorder = None
    if routed:
        recorder = RecordingRouter(gate)
        previous = model.router
        model.set_router(recorder)
        start = time.perf_counter()
        try:
            _run_jobs(model, routed, [j.example.prompt for j in routed], config.batch_size, config.progress,
                      "eval: learned gate (routed in-pass)", recorder)
        finally:
            model.set_router(previous)
        timings["gate_seconds"] = time.perf_counter() - start
    every = explicit + routed
    for job, ok in zip(every, score_examples([j.example for j in every], [j.prediction for j in every]),
                       strict=True):
        job.correct = ok
    from moa.eval.report import summarise

    return summarise(every, domains, list(adapters), gate, picked, comp, budgets, timings, config)
