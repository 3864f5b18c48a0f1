"""Training the learned gate: on domain labels (cached features) or through the LM loss.

* **labels** (default, seconds): one partial base pass per batch of prompts (only the
  layers below the gate's ``hidden_layer`` run) gives the gate's input features, cached;
  then the head trains with cross-entropy on the domain labels.
* **lm** (end to end): the adapters stay frozen; every step runs the mixture with the
  gate's *soft* weights over all adapters (top-k would cut the gradient of a top-1 gate)
  and back-propagates the answer tokens' LM loss into the gate through
  ``RoutingDecision.weights``. It runs on ``transformers.Trainer``
  (:class:`moa.train.trainer.MixtureTrainer`): gradient accumulation, ``optim``,
  checkpoints and resuming, logging, ``accelerate launch``.

The labels mode stays a ten-line loop on purpose: its input is an in-memory ``[N, H]``
tensor of cached features and a full epoch takes milliseconds, so Trainer would add a
dataloader, an accelerator and checkpoint machinery and nothing it needs (no LM, no
distributed data, nothing worth resuming).

The features are computed exactly as the in-pass router sees them: chat template, left
padding, positions counted over real tokens, no adapter, mean over the prompt's mask.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moa.routing.learned_gate import LearnedGate, pool_hidden_states
from moa.routing.router import Router, RoutingRequest
from moa.data.chat import encode_sft_example, ensure_pad_token, pad_batch, position_ids_from_mask

logger = logging.getLogger(__name__)


def layer_inputs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """The base's inputs to decoder ``layers`` (no adapter), by one partial pass.

    Only the layers up to ``max(layers)`` run. Positions follow the mask (left padding),
    as in ``generate``.
    """
    return model.hidden_states_at(list(layers), input_ids, attention_mask,
                                  position_ids=position_ids_from_mask(attention_mask))


def collect_features(
    model: Any,
    prompts: Sequence[str],
    layers: int | Sequence[int],
    level: str = "sequence",
    batch_size: int = 32,
    progress: bool = False,
) -> dict[int, torch.Tensor] | torch.Tensor:
    """Gate input features of ``prompts`` at one layer (a tensor) or several (a dict).

    Args:
        model: A :class:`moa.MixtureModel` with a tokenizer.
        prompts: User messages (the chat template is applied).
        layers: Decoder layer index (or indices) whose input is read.
        level: ``"sequence"``: ``[N, H]`` pooled over each prompt; ``"token"``: one row
            per real token, ``[sum of lengths, H]`` (see :func:`token_counts`).
        batch_size: Prompts per partial pass.
        progress: Show a tqdm bar.
    """
    from moa.data.chat import chat_prompt

    single = isinstance(layers, int)
    wanted = [layers] if single else list(layers)
    tokenizer = model.tokenizer
    ensure_pad_token(tokenizer)
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in wanted}
    ids = [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    for start in tqdm(range(0, len(ids), batch_size), desc="gate features", disable=not progress):
        batch = pad_batch(ids[start:start + batch_size], tokenizer.pad_token_id, side="left")
        batch = {k: v.to(model.device) for k, v in batch.items()}
        hidden = layer_inputs(model, batch["input_ids"], batch["attention_mask"], wanted)
        for layer in wanted:
            if level == "token":
                mask = batch["attention_mask"].bool()
                out[layer].append(hidden[layer].float()[mask].cpu())
            else:
                out[layer].append(pool_hidden_states(hidden[layer], batch["attention_mask"]).cpu())
    result = {layer: torch.cat(chunks) for layer, chunks in out.items()}
    return result[wanted[0]] if single else result


def token_counts(model: Any, prompts: Sequence[str]) -> list[int]:
    """Tokens per chat-formatted prompt (to repeat sequence labels for token-level training)."""
    from moa.data.chat import chat_prompt

    return [len(model.tokenizer(chat_prompt(model.tokenizer, p), add_special_tokens=False)["input_ids"])
            for p in prompts]


def train_gate_on_labels(
    gate: LearnedGate,
    features: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 200,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    batch_size: int = 256,
    seed: int = 0,
    dev: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Cross-entropy on cached features; sets the gate's input normalisation first.

    Args:
        gate: The gate to train (its head is re-initialised by the seed only if new).
        features: ``[N, H]`` pooled (or per-token) features.
        labels: ``[N]`` index into ``gate.gate_adapters``.
        epochs: Passes over the data.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        batch_size: Rows per step.
        seed: Data order.
        dev: Optional ``(features, labels)`` to report a dev accuracy.

    Returns:
        Metrics: final loss, train (and dev) accuracy, seconds.
    """
    start = time.perf_counter()
    gate.head.set_normalization(features)
    optimizer = torch.optim.AdamW(gate.head.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    labels = labels.long()
    gate.train()
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(gate.logits(features[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    gate.eval()
    metrics: dict[str, Any] = {"mode": "labels", "epochs": epochs, "final_loss": float(loss.detach()),
                               "train_accuracy": gate_accuracy(gate, features, labels),
                               "train_rows": len(features), "seconds": round(time.perf_counter() - start, 3)}
    if dev is not None:
        metrics["dev_accuracy"] = gate_accuracy(gate, *dev)
    return metrics


def gate_accuracy(gate: LearnedGate, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose top-1 adapter is their label."""
    with torch.no_grad():
        return float((gate.logits(features).argmax(-1) == labels.long()).float().mean())


class _SeenHidden(Router):
    """Passes a token-level gate through, keeping the hidden states it decided from."""

    def __init__(self, gate: LearnedGate) -> None:
        self.gate = gate
        self.name, self.level, self.hidden_layer = gate.name, gate.level, gate.hidden_layer
        self.hidden: torch.Tensor | None = None

    def route(self, request: RoutingRequest) -> Any:
        self.hidden = request.hidden_states
        return self.gate.route(request)


class GateObjective(torch.nn.Module):
    """The frozen mixture's LM loss as a function of the gate: the module Trainer trains.

    Only the gate is a submodule (so Trainer, DDP and the checkpoints see its parameters
    alone); the MixtureModel is held as a plain attribute and stays frozen and in its mode.
    ``rows`` index the cached gate features of the batch's examples.

    With ``routing_labels`` (token level), an example whose label is an adapter index also
    pulls every one of its positions towards that adapter: ``routing_weight`` x the
    cross-entropy of the gate's logits against it, added to the LM loss. Examples labelled
    ``-100`` (the composite ones) are left to the LM loss alone.
    """

    accepts_loss_kwargs = True  # Trainer passes num_items_in_batch: exact gradient accumulation

    def __init__(self, model: Any, gate: LearnedGate, features: torch.Tensor,
                 routing_labels: torch.Tensor | None = None, routing_weight: float = 0.0):
        super().__init__()
        self.gate = gate
        self.__dict__["mixture"] = model  # not registered: not trained, saved or wrapped
        self.features = features
        self.routing_labels = routing_labels
        self.routing_weight = float(routing_weight)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                rows: torch.Tensor, num_items_in_batch: Any = None) -> Any:
        """The mixture's output (with ``loss``) under the gate's soft weights over all its adapters."""
        model = self.mixture
        extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        supervise = self.gate.level == "token" and self.routing_labels is not None and self.routing_weight > 0
        seen = _SeenHidden(self.gate) if supervise else None
        if self.gate.level == "token":
            # Decided in the same pass, on every position's own hidden state, with the gate's
            # own top-k (as at inference); the weights stay on the autograd graph.
            routing = {"adapter_names": ["auto"] * int(input_ids.shape[0]), "router": seen or self.gate}
        else:
            decision = self.gate.decision_from_features(self.features[rows.cpu()].to(model.device),
                                                        model.adapter_names, top_k=len(self.gate.gate_adapters))
            routing = {"routing_decision": decision, "adapters_from_layer": self.gate.hidden_layer}
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False,
                    **routing, **extra)
        if seen is not None and seen.hidden is not None:
            target = self.routing_labels[rows.cpu()].to(input_ids.device)[:, None].expand_as(input_ids)
            target = target.masked_fill(attention_mask == 0, -100).reshape(-1)
            if bool((target >= 0).any()):
                logits = self.gate.logits(seen.hidden.reshape(-1, seen.hidden.shape[-1]))
                out["loss"] = out["loss"] + self.routing_weight * F.cross_entropy(logits.float(), target,
                                                                                  ignore_index=-100)
        return out


def _gate_order(n_examples: int, batches: int, batch_size: int, seed: int) -> list[int]:
    """The hand-written loop's order: each batch is the head of a fresh permutation."""
    generator = torch.Generator().manual_seed(int(seed))
    order: list[int] = []
    for _ in range(batches):
        order.extend(torch.randperm(n_examples, generator=generator)[:batch_size].tolist())
    return order


def train_gate_lm(
    model: Any,
    gate: LearnedGate,
    examples: Sequence[Any],
    steps: int = 30,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    max_length: int = 1024,
    progress: bool = True,
    gradient_accumulation_steps: int = 1,
    optim: str = "adamw_torch",
    report_to: str = "none",
    checkpoint_dir: str | os.PathLike | None = None,
    save_steps: int = 0,
    resume: bool | str = False,
    routing_labels: Sequence[str | None] | None = None,
    routing_weight: float = 0.0,
) -> dict[str, Any]:
    """Train the gate end to end through the LM loss of the frozen adapters' mixture (on Trainer).

    A ``level="token"`` gate (LoRA-Flow's setting, arXiv 2402.11455) is trained as it runs:
    inside the forward, on every position's hidden state, with its own ``top_k``; its input
    standardisation comes from the prompts' per-token features.

    Each step: features of the prompts (cached partial pass, no gradient: they do not
    depend on the gate), soft weights over all of the gate's adapters, a forward of
    prompt + answer with those weights pinned from layer ``hidden_layer`` on, and the
    answer tokens' loss back-propagated into the gate's head only. Trainer brings gradient
    accumulation, ``optim``, checkpoints (the gate's tensors) and ``resume``, logging and
    ``accelerate launch``; the LR is constant, AdamW's weight decay 0.01, no clipping, as
    in the loop this replaces.

    ``routing_labels`` (token-level gates; one adapter name or ``None`` per example) add a
    supervised term: ``routing_weight`` x the cross-entropy of the gate's logits at every
    position of a labelled example against its adapter. Label the replayed single-domain
    examples with their domain and the composite ones ``None``: the gate then keeps a
    single-domain answer on its own adapter, where the LM loss alone is often indifferent
    (many tokens are predicted as well by several adapters), and stays free on composites.

    Returns:
        Metrics: the loss curve, weight change, seconds.
    """
    from moa.train.trainer import MixtureTrainer, OrderedDataset, last_checkpoint, report_trainable, training_arguments

    tokenizer = model.tokenizer
    ensure_pad_token(tokenizer)
    own = {id(p) for p in gate.parameters()}  # the gate may be the model's router (a submodule)
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    for p in frozen:
        p.requires_grad_(False)
    prompts = [e.prompt for e in examples]
    features = collect_features(model, prompts, gate.hidden_layer, level=gate.level)
    if gate.head.feature_std.eq(1).all():
        gate.head.set_normalization(features)
    if gate.level == "token":
        features = features[:0]  # a token gate routes in the pass; only the standardisation needed them
    encoded = [encode_sft_example(tokenizer, e.prompt, e.answer, max_length) for e in examples]
    items = [{"input_ids": ids, "labels": labels, "rows": i} for i, (ids, labels) in enumerate(encoded)]
    targets = None
    if routing_labels is not None:
        if len(routing_labels) != len(examples):
            raise ValueError(f"routing_labels has {len(routing_labels)} entries for {len(examples)} examples; "
                             f"give one adapter name (or None) per example.")
        index = {name: i for i, name in enumerate(gate.gate_adapters)}
        unknown = sorted({str(n) for n in routing_labels if n is not None and n not in index})
        if unknown:
            raise ValueError(f"routing_labels name adapters the gate does not route: {unknown}. "
                             f"The gate's adapters: {list(gate.gate_adapters)}.")
        targets = torch.tensor([-100 if n is None else index[n] for n in routing_labels], dtype=torch.long)
    objective = GateObjective(model, gate, features, targets, routing_weight)
    report_trainable(objective, "gate (LM loss)")
    before = [p.detach().clone() for p in gate.head.parameters()]
    per_batch = min(batch_size, len(examples))
    with tempfile.TemporaryDirectory(prefix="moa-gate-") as scratch:
        args = training_arguments(checkpoint_dir or scratch, steps=steps, batch_size=per_batch, lr=lr, seed=seed,
                                  gradient_accumulation_steps=gradient_accumulation_steps, weight_decay=1e-2,
                                  max_grad_norm=0.0, optim=optim, save_steps=save_steps, report_to=report_to,
                                  progress=progress)
        order = _gate_order(len(examples), steps * gradient_accumulation_steps * args.world_size, per_batch, seed)
        trainer = MixtureTrainer(model=objective, args=args, train_dataset=OrderedDataset(items, order),
                                 data_collator=_gate_collator(tokenizer.pad_token_id), lr_lambda=lambda _step: 1.0)
        start_from = (last_checkpoint(args.output_dir) if resume is True else str(resume)) if resume else None
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=start_from)
        seconds = time.perf_counter() - start
    gate.eval()
    for p in frozen:
        p.requires_grad_(True)
    losses = trainer.step_losses
    change = sum(float((p.detach() - b).abs().sum()) for p, b in zip(gate.head.parameters(), before, strict=True))
    return {"mode": "lm", "steps": steps, "trainer": "transformers.Trainer", "loss_curve": [round(x, 5) for x in losses],
            "final_loss": losses[-1] if losses else None, "weight_change_l1": change, "seconds": round(seconds, 2)}


def _gate_collator(pad_id: int) -> Any:
    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pad_batch([r["input_ids"] for r in rows], pad_id, labels=[r["labels"] for r in rows])
        batch["rows"] = torch.tensor([r["rows"] for r in rows], dtype=torch.long)
        return batch

    return collate


def labels_for(examples: Sequence[Any], adapter_names: Sequence[str]) -> torch.Tensor:
    """Index of each example's domain in ``adapter_names``."""
    index = {name: i for i, name in enumerate(adapter_names)}
    return torch.tensor([index[e.domain] for e in examples], dtype=torch.long)


def train_router(
    model: Any,
    train_examples: Sequence[Any],
    adapter_names: Sequence[str],
    hidden_layer: int = 2,
    mode: str = "labels",
    level: str = "sequence",
    dev_examples: Sequence[Any] = (),
    mlp_hidden: int = 64,
    top_k: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
    lm_steps: int = 30,
    progress: bool = True,
    lm_options: dict[str, Any] | None = None,
) -> tuple[LearnedGate, dict[str, Any]]:
    """Build and train a :class:`LearnedGate` for ``model``'s domain adapters.

    ``mode="labels"`` trains on the examples' domains; ``mode="lm"`` first does that
    (a good start) and then trains end to end through the LM loss (:func:`train_gate_lm`,
    on Trainer; ``lm_options`` are its keyword arguments: ``batch_size``, ``lr``,
    ``gradient_accumulation_steps``, ``optim``, ``checkpoint_dir``, ``save_steps``, ``resume``...).

    Returns:
        The trained gate (in eval mode) and its metrics.
    """
    torch.manual_seed(seed)
    gate = LearnedGate(adapter_names, model.config.hidden_size, hidden_layer=hidden_layer, level=level,
                       mlp_hidden=mlp_hidden, top_k=top_k, temperature=temperature)
    train = [e for e in train_examples if e.domain in set(adapter_names)]
    start = time.perf_counter()
    features = collect_features(model, [e.prompt for e in train], hidden_layer, level=level, progress=progress)
    labels = labels_for(train, adapter_names)
    dev = None
    dev_list = [e for e in dev_examples if e.domain in set(adapter_names)]
    if dev_list:
        dev_features = collect_features(model, [e.prompt for e in dev_list], hidden_layer, level=level)
        dev_labels = labels_for(dev_list, adapter_names)
        if level == "token":
            dev_labels = dev_labels.repeat_interleave(torch.tensor(token_counts(model, [e.prompt for e in dev_list])))
        dev = (dev_features, dev_labels)
    if level == "token":
        labels = labels.repeat_interleave(torch.tensor(token_counts(model, [e.prompt for e in train])))
    feature_seconds = time.perf_counter() - start
    metrics = train_gate_on_labels(gate, features, labels, seed=seed, dev=dev)
    metrics["feature_seconds"] = round(feature_seconds, 2)
    if mode == "lm":
        metrics["lm"] = train_gate_lm(model, gate, train, steps=lm_steps, seed=seed, progress=progress,
                                      **(lm_options or {}))
        if dev is not None:
            metrics["dev_accuracy_after_lm"] = gate_accuracy(gate, *dev)
    elif mode != "labels":
        raise ValueError(f"Unknown router training mode {mode!r}. Choices: labels, lm.")
    gate.metadata.update({"training": metrics, "base_fingerprint": model.base_fingerprint})
    logger.info("Gate trained (%s): %s", mode, {k: v for k, v in metrics.items() if "accuracy" in k})
    return gate, metrics
