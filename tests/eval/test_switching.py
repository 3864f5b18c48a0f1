"""The trace of a per-token gate during generation matches generate and a full teacher-forced pass."""

from __future__ import annotations

import pytest
import torch

import moa
from moa.data.chat import chat_prompt
from moa.errors import RoutingError
from moa.eval.slots import DecisionRecorder
from moa.eval.switching import TracedToken, segments, trace_generation
from moa.routing.learned_gate import LearnedGate
from moa.routing.router import Router
from moa.testing.fixtures import make_tiny_model

NAMES = ["a", "b", "c"]


class FeatureRouter(Router):
    """Per token, top-2 of a softmax over three features of its hidden state: a rule that
    depends on the token only (not on the batch or the pass), and switches often."""

    name = "feature-router"
    level = "token"
    hidden_layer = 2

    def route(self, request):
        h = request.hidden_states.reshape(-1, request.hidden_states.shape[-1])
        weights, ids = torch.softmax(8 * h[:, [0, 5, 9]], dim=-1).topk(2, dim=-1)
        return moa.RoutingDecision(ids.to(torch.int32), weights / weights.sum(-1, keepdim=True), level="token")


@pytest.fixture(scope="module")
def model_and_gate():
    model = make_tiny_model(seed=0)
    for i, name in enumerate(NAMES):
        torch.manual_seed(10 + i)
        model.add_adapter(name, moa.LoraConfig(r=4, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    return model, FeatureRouter()


@torch.no_grad()
def test_trace_equals_generate_and_the_full_pass(model_and_gate):
    model, gate = model_and_gate
    tokenizer = model.tokenizer
    traced = trace_generation(model, "route me", gate, max_new_tokens=8)
    ids = tokenizer(chat_prompt(tokenizer, "route me"), add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=["auto"], router=gate,
                         max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
    new = out[0, ids.shape[1]:].tolist()[: len(traced)]
    assert [t.text for t in traced] == [tokenizer.decode([t]) for t in new]
    assert len(traced) > 2
    # the reference: one forward over prompt + answer, no cache; position p predicts token p + 1
    recorder = DecisionRecorder(gate)
    full = torch.tensor([ids[0].tolist() + new])
    model(full, adapter_names=["auto"], router=recorder, use_cache=False)
    (_rows, _width), decision = recorder.calls[0]
    for i, token in enumerate(traced):
        position = ids.shape[1] - 1 + i
        weights = {NAMES[int(a)]: float(w) for a, w in zip(decision.ids[position], decision.weights[position],
                                                           strict=True) if int(a) >= 0 and float(w) > 0}
        assert token.adapter == max(weights, key=weights.get)
        assert token.weights == pytest.approx(weights, abs=1e-5)
    assert len({t.adapter for t in traced}) > 1, "the rule should switch at least once"


def test_segments_join_runs_of_one_adapter():
    tokens = [TracedToken("def", "code", {}), TracedToken(" f", "code", {}), TracedToken("un", "french", {}),
              TracedToken('"', "code", {}), TracedToken("x", None, {})]
    assert segments(tokens) == [("def f", "code"), ("un", "french"), ('"', "code"), ("x", None)]
    assert segments([]) == []


def test_a_sequence_level_router_is_refused(model_and_gate):
    model, _ = model_and_gate
    sequence_gate = LearnedGate(NAMES, hidden_size=model.config.hidden_size, level="sequence")
    with pytest.raises(RoutingError, match="token-level router"):
        trace_generation(model, "x", sequence_gate, 4)
