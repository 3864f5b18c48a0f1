"""Routing accuracy on held-out domain prompts: keyword rules vs embedding centroids vs the learned gate.

Three routers pick one of the five built-in domains (``moa.data.DOMAINS``) for every prompt
of the test splits, which include instruction phrasings never seen in training:

* ``keyword`` (plugin moa-router-keyword): regex rules written from the *training*
  phrasings (no test prompt was looked at), first match wins; no training.
* ``embedding`` (plugin moa-router-embedding): cosine similarity of the prompt's mean
  hidden state at layer ``--hidden-layer`` to per-domain centroids fitted on training prompts.
* ``learned_gate`` (built in): an MLP head on the same features, trained on domain labels.

Every router gets exactly the request moa builds when serving: the prompt through the chat
template, left padding, and for hidden-state routers the input of decoder layer L with
no adapter (as inside ``model.generate``). Routing only needs adapter *names*, so zero-init
LoRA adapters named after the domains stand in for trained ones. Accuracy = the row's
highest-weight adapter is its domain (a row routed to no adapter counts as wrong).

Run: ``python examples/compare_routers.py [--base default] [--train-per-domain 300]
[--test-per-domain 0] [--hidden-layer 2] [--gate-epochs 200] [--out routing.json]``
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

import moa
from moa.data import DOMAINS, HELD_OUT_PHRASINGS, Example, load_split
from moa.routing import Router, RoutingRequest
from moa.routing.learned_gate import LearnedGate
from moa.data.chat import chat_prompt, ensure_pad_token, pad_batch
from moa.train.router import collect_features, layer_inputs, train_gate_on_labels

logger = logging.getLogger("compare_routers")

#: Keyword rules per domain, written from the training phrasings (moa.data.PHRASINGS minus
#: the held-out ones) and general knowledge of each domain; order = priority (first match).
KEYWORD_RULES: list[tuple[str, dict[str, float]]] = [
    (r"\bsql(ite)?\b|\bquery\b|\bschema\b|\b(database )?tables?\b", {"sql": 1.0}),
    (r"\bicd(-10(-cm)?)?\b|\bdiagnos(is|es|ed)\b|\bchapter\b", {"icd": 1.0}),
    (r"\bpython\b|\bfunction\b|\bsolve\(|\bimplement\b|\bdef\b|\breturn(s|ing)?\b", {"code": 1.0}),
    (r"\bfrench\b|\bfran[cç]ais\b", {"french": 1.0}),
    (r"\d\s*[-+*/×÷x]\s*\(?\s*-?\d|\bcompute\b|\bcalculate\b|\bevaluate\b", {"arithmetic": 1.0}),
]


def split_examples(split: str, per_domain: int) -> list[Example]:
    """The first ``per_domain`` examples (0 = all) of ``split`` for every domain, in domain order."""
    out: list[Example] = []
    for domain in DOMAINS:
        examples = load_split(domain, split)
        out.extend(examples[:per_domain] if per_domain > 0 else examples)
    return out


def requests_for(model: Any, examples: Sequence[Example], layer: int, batch_size: int) -> Iterator[
        tuple[list[Example], RoutingRequest]]:
    """Batches of examples with the request moa builds for them in ``generate``."""
    tokenizer = model.tokenizer
    ensure_pad_token(tokenizer)
    for start in range(0, len(examples), batch_size):
        batch = list(examples[start : start + batch_size])
        ids = [tokenizer(chat_prompt(tokenizer, e.prompt), add_special_tokens=False)["input_ids"] for e in batch]
        padded = {k: v.to(model.device) for k, v in pad_batch(ids, tokenizer.pad_token_id, side="left").items()}
        hidden = layer_inputs(model, padded["input_ids"], padded["attention_mask"], [layer])[layer]
        yield batch, RoutingRequest(input_ids=padded["input_ids"], adapter_names=model.adapter_names,
                                    attention_mask=padded["attention_mask"],
                                    texts=[e.prompt for e in batch], hidden_states=hidden)


def top1(mixture: dict[str, float]) -> str | None:
    """The highest-weight adapter of a row, or ``None`` for a base-only row."""
    return max(mixture, key=mixture.get) if mixture else None


def build_routers(model: Any, train: Sequence[Example], layer: int, gate_epochs: int = 200) -> dict[str, Router]:
    """The keyword router, and the embedding router and learned gate fitted on ``train``."""
    from moa_router_embedding import EmbeddingRouter
    from moa_router_keyword import KeywordRouter

    start = time.perf_counter()
    features = collect_features(model, [e.prompt for e in train], layer)
    labels = torch.tensor([DOMAINS.index(e.domain) for e in train])
    logger.info("Features of %d training prompts at layer %d: %.1f s.", len(train), layer,
                time.perf_counter() - start)
    embedding = EmbeddingRouter(hidden_layer=layer, top_k=1).fit_features(
        {domain: features[labels == i] for i, domain in enumerate(DOMAINS)})
    torch.manual_seed(0)
    gate = LearnedGate(list(DOMAINS), model.config.hidden_size, hidden_layer=layer)
    metrics = train_gate_on_labels(gate, features, labels, epochs=gate_epochs)
    logger.info("Learned gate trained: train accuracy %.3f in %.1f s.", metrics["train_accuracy"],
                metrics["seconds"])
    keyword = KeywordRouter(KEYWORD_RULES, mode="first")
    return {"keyword": keyword, "embedding": embedding, "learned_gate": gate}


def evaluate(model: Any, routers: dict[str, Router], test: Sequence[Example], layer: int,
             batch_size: int) -> dict[str, Any]:
    """Routing accuracy of each router: overall, per domain, on held-out phrasings."""
    hits = {name: {"all": [0, 0], "held_out": [0, 0], **{d: [0, 0] for d in DOMAINS}} for name in routers}
    unrouted = dict.fromkeys(routers, 0)
    seconds = dict.fromkeys(routers, 0.0)
    for batch, request in requests_for(model, test, layer, batch_size):
        for name, router in routers.items():
            start = time.perf_counter()
            with torch.no_grad():
                mixtures = router.route(request).to_mixtures(request.adapter_names)
            seconds[name] += time.perf_counter() - start
            for example, mixture in zip(batch, mixtures, strict=True):
                chosen = top1(mixture)
                unrouted[name] += chosen is None
                keys = ["all", example.domain]
                if example.phrasing in HELD_OUT_PHRASINGS[example.domain]:
                    keys.append("held_out")
                for key in keys:
                    hits[name][key][0] += chosen == example.domain
                    hits[name][key][1] += 1
    return {
        name: {
            "accuracy": {key: (right / total if total else None) for key, (right, total) in table.items()},
            "counts": {key: total for key, (_, total) in table.items()},
            "unrouted": unrouted[name],
            "route_ms_per_prompt": 1000 * seconds[name] / max(len(test), 1),
        }
        for name, table in hits.items()
    }


def evaluate_composite(model: Any, routers: dict[str, Router], layer: int, batch_size: int) -> dict[str, Any]:
    """On the composite prompts (two domains each, ``meta["combines"]``), with top-2 routing.

    The keyword router adds every matching rule (``mode="sum"``); the others keep their 2 best.
    Reported: the share whose two highest-weight adapters are exactly the two domains, and
    the share whose top-1 is one of them.
    """
    from moa.data import load_composite

    composite = load_composite()
    both = dict.fromkeys(routers, 0)
    either = dict.fromkeys(routers, 0)
    saved = {}
    for name, router in routers.items():
        saved[name] = (getattr(router, "top_k", None), getattr(router, "mode", None))
        if hasattr(router, "top_k"):
            router.top_k = 2
        if hasattr(router, "mode"):
            router.mode = "sum"
    try:
        for batch, request in requests_for(model, composite, layer, batch_size):
            for name, router in routers.items():
                with torch.no_grad():
                    mixtures = router.route(request).to_mixtures(request.adapter_names)
                for example, mixture in zip(batch, mixtures, strict=True):
                    wanted = set(example.meta["combines"])
                    ranked = sorted(mixture, key=mixture.get, reverse=True)
                    both[name] += set(ranked[:2]) == wanted
                    either[name] += bool(ranked) and ranked[0] in wanted
    finally:
        for name, router in routers.items():
            top_k, mode = saved[name]
            if top_k is not None:
                router.top_k = top_k
            if mode is not None:
                router.mode = mode
    count = max(len(composite), 1)
    return {name: {"both_domains_top2": both[name] / count, "top1_is_one_of_them": either[name] / count,
                   "prompts": len(composite)} for name in routers}


def render(results: dict[str, Any]) -> str:
    """A plain-text table: one row per router, columns all / held-out phrasings / each domain."""
    columns = ["all", "held_out", *DOMAINS]
    lines = [f"{'router':<13}" + "".join(f"{c:>11}" for c in columns) + f"{'unrouted':>10}"]
    for name, result in results.items():
        cells = [result["accuracy"][c] for c in columns]
        lines.append(f"{name:<13}" + "".join(f"{'-' if v is None else f'{v:.3f}':>11}" for v in cells)
                     + f"{result['unrouted']:>10}")
    counts = results[next(iter(results))]["counts"]
    lines.append(f"{'(prompts)':<13}" + "".join(f"{counts[c]:>11}" for c in columns))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the comparison; returns ``{"results": ..., "composite": ...}`` (also logged)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="default", help="'default', or a base model folder")
    parser.add_argument("--quantization", default="none", choices=["nf4", "none"])
    parser.add_argument("--train-per-domain", type=int, default=300, help="training prompts per domain")
    parser.add_argument("--test-per-domain", type=int, default=0, help="test prompts per domain (0 = all)")
    parser.add_argument("--hidden-layer", type=int, default=2, help="layer the hidden-state routers read")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gate-epochs", type=int, default=200, help="learned gate training epochs")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    model = moa.MixtureModel.from_pretrained(args.base, quantization=None if args.quantization == "none" else "nf4")
    for domain in DOMAINS:  # routing needs only the names: zero-init stand-ins for trained adapters
        model.add_adapter(domain, moa.LoraConfig(r=1, target_modules=["q_proj"]))
    train = split_examples("train", args.train_per_domain)
    test = split_examples("test", args.test_per_domain)
    routers = build_routers(model, train, args.hidden_layer, args.gate_epochs)
    results = evaluate(model, routers, test, args.hidden_layer, args.batch_size)
    logger.info("Routing accuracy on %d held-out test prompts (%d with phrasings unseen in training):\n%s",
                len(test), results["keyword"]["counts"]["held_out"], render(results))
    composite = evaluate_composite(model, routers, args.hidden_layer, args.batch_size)
    logger.info("Composite prompts (two domains each), top-2 routing:\n%s", "\n".join(
        f"{name:<13} both domains in top-2: {r['both_domains_top2']:.3f}   top-1 one of them: "
        f"{r['top1_is_one_of_them']:.3f}   ({r['prompts']} prompts)" for name, r in composite.items()))
    if args.out is not None:
        args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)},
                                        "results": results, "composite": composite},
                                       indent=2, default=str) + "\n")
        logger.info("Wrote %s.", args.out)
    return {"results": results, "composite": composite}


if __name__ == "__main__":
    main()
