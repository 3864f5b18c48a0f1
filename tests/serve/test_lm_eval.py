"""lm-evaluation-harness against a live ``moa serve``, offline, over two adapters.

Two tasks of ours, defined from local JSONL files (docs/evaluating.md shows the same
files): a log-likelihood task (``multiple_choice``: lm-eval scores each choice with an
``echo`` + ``logprobs`` request) and a ``generate_until`` task. lm-eval runs in a child
process (``lm_eval.simple_evaluate`` with a ``TaskManager(include_path=...)``, the
``local-completions`` model, the tiny model's tokenizer saved to a folder), with the Hub
and datasets offline and every socket connection to anything but the loopback refused and
recorded. Its per-item log-likelihoods must equal moa's offline ones (a plain forward of
the tiny model under the adapter, float32, 1e-4), and its generations ``generate``'s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.serve.conftest import API_KEY

pytest.importorskip("lm_eval")

ADAPTERS = ("sql", "code")
TOL = 1e-4
CHOICE_ITEMS = [
    {"question": "SELECT name FROM", "choices": [" users", " orders;", " 42"], "answer": 0},
    {"question": "The capital of France is", "choices": [" Paris", " Rome"], "answer": 0},
    {"question": "2 + 2 =", "choices": [" 4", " five", " 22"], "answer": 0},
]
GENERATE_ITEMS = [
    {"prompt": "Translate to SQL: all users\n", "target": "SELECT * FROM users;"},
    {"prompt": "hello", "target": " world"},
]

TASKS = {
    "moa_choice.yaml": """
        task: moa_choice
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}/choice.jsonl
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        target_delimiter: ""
        metric_list:
          - metric: acc
    """,
    "moa_generate.yaml": """
        task: moa_generate
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}/generate.jsonl
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{prompt}}}}"
        doc_to_target: "{{{{target}}}}"
        target_delimiter: ""
        generation_kwargs:
          until: ["\\n\\n", "###"]
          max_gen_toks: 8
          do_sample: false
          temperature: 0
        metric_list:
          - metric: exact_match
    """,
}

#: The child process: refuse non-loopback connections, run both tasks per adapter, dump the samples.
RUNNER = """
import json, socket, sys
attempts = []
_connect = socket.socket.connect
def guarded(self, address):
    host = address[0] if isinstance(address, tuple) else str(address)
    if host not in ("127.0.0.1", "localhost", "::1"):
        attempts.append(repr(address))
        raise OSError("this test allows no network beyond the loopback")
    return _connect(self, address)
socket.socket.connect = guarded

import lm_eval
from lm_eval.tasks import TaskManager

base_url, tokenizer, tasks_dir, out_path = sys.argv[1:5]
adapters = sys.argv[5:]
manager = TaskManager(include_path=tasks_dir)
results = {}
for adapter in adapters:
    run = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": adapter, "base_url": base_url, "tokenizer": tokenizer,
                    "tokenizer_backend": "huggingface", "tokenized_requests": True, "batch_size": 2,
                    "max_length": 200, "max_retries": 1, "num_concurrent": 1, "timeout": 120},
        tasks=["moa_choice", "moa_generate"], task_manager=manager, log_samples=True, bootstrap_iters=0)
    results[adapter] = {
        "samples": {task: [{"doc_id": s["doc_id"], "arguments": s["arguments"], "resps": s["resps"],
                            "filtered_resps": s["filtered_resps"]} for s in samples]
                    for task, samples in run["samples"].items()},
        "metrics": {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                    for task, metrics in run["results"].items()},
    }
json.dump({"results": results, "network_attempts": attempts}, open(out_path, "w"))
"""


def write_tasks(root: Path) -> Path:
    data = root / "data"
    data.mkdir()
    (data / "choice.jsonl").write_text("".join(json.dumps(item) + "\n" for item in CHOICE_ITEMS))
    (data / "generate.jsonl").write_text("".join(json.dumps(item) + "\n" for item in GENERATE_ITEMS))
    tasks = root / "tasks"
    tasks.mkdir()
    for name, text in TASKS.items():
        (tasks / name).write_text(textwrap.dedent(text).format(data=data))
    return tasks


def offline_loglikelihood(model, context: list[int], continuation: list[int], adapter: str) -> tuple[float, bool]:
    """moa's offline score: the continuation's summed log-probability and whether it is greedy."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = model(ids, adapter_names=[adapter]).logits[0].float()
    logprobs = torch.log_softmax(logits[len(context) - 1:-1], dim=-1)
    targets = torch.tensor(continuation)
    picked = logprobs.gather(-1, targets[:, None])[:, 0]
    return float(picked.sum()), bool((logprobs.argmax(-1) == targets).all())


def offline_generation(model, prompt: list[int], adapter: str, max_tokens: int, until: list[str]) -> str:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=model.tokenizer.pad_token_id, adapter_names=[adapter])
    new = out[0, len(prompt):].tolist()
    eos = model.tokenizer.eos_token_id
    text = model.tokenizer.decode(new[: new.index(eos)] if eos in new else new, skip_special_tokens=True)
    cuts = [text.find(stop) for stop in until if stop in text]
    return text[: min(cuts)] if cuts else text


def test_lm_eval_local_completions_equals_offline_scores(main_stack, tmp_path):
    tokenizer = main_stack.model.tokenizer
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    tasks = write_tasks(tmp_path)
    out = tmp_path / "lm_eval.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "OPENAI_API_KEY": API_KEY, "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-c", RUNNER, f"{main_stack.base_url}/v1/completions", str(tokenizer_dir),
                          str(tasks), str(out), *ADAPTERS], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["network_attempts"] == []

    model = main_stack.model
    scores = {}
    for adapter in ADAPTERS:
        samples = report["results"][adapter]["samples"]
        choice = sorted(samples["moa_choice"], key=lambda s: s["doc_id"])
        assert len(choice) == len(CHOICE_ITEMS)
        for sample, item in zip(choice, CHOICE_ITEMS, strict=True):
            assert len(sample["resps"]) == len(item["choices"])
            for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
                context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
                continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
                loglikelihood, greedy = offline_loglikelihood(model, context_ids, continuation_ids, adapter)
                served, served_greedy = resp[0]
                assert float(served) == pytest.approx(loglikelihood, abs=TOL), (adapter, context, continuation)
                assert bool(served_greedy) == greedy
                scores.setdefault(adapter, []).append(loglikelihood)
        generated = sorted(samples["moa_generate"], key=lambda s: s["doc_id"])
        assert len(generated) == len(GENERATE_ITEMS)
        for sample, item in zip(generated, GENERATE_ITEMS, strict=True):
            prompt_ids = tokenizer(item["prompt"], add_special_tokens=False)["input_ids"]
            expected = offline_generation(model, prompt_ids, adapter, 8, ["\n\n", "###"])
            assert sample["resps"][0][0] == expected, adapter
        assert "acc,none" in report["results"][adapter]["metrics"]["moa_choice"]
    assert scores["sql"] != pytest.approx(scores["code"], abs=1e-3)  # two adapters, two sets of scores
