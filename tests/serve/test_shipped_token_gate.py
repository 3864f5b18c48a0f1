"""``moa serve --router <the shipped token gate>`` on the default base answers every ``auto``
request as ``model.generate`` does with that router (it routes every token), 16 requests sent
at once by the ``openai`` client (integration: the real base, NF4, the five shipped adapters)."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")

PROMPTS = [
    "Write 47 in French words.", "Write 12 in French words.", "Write 13 in French words.",
    "How do you say 81 in French?", "Compute 17 + 25.", "What is 9 times 8?", "Add 123 and 456.",
    "Write a SQL query that counts the rows of the table users.", "Select every name from the table pets.",
    "Write a Python function that reverses a string.", "A function that returns the square of n, in Python.",
    "Which ICD-10-CM chapter holds J45.909?", "ICD-10-CM chapter of E11.9?",
    "Translate 'good morning' to French.", "What is 15 minus 7? Then write the result in French.",
    "Name a table and a query over it.",
]
MAX_TOKENS = 16


@pytest.mark.integration
def test_the_shipped_token_gate_is_served_as_generate_routes_it():
    import uvicorn

    from moa.cli import build_parser
    from moa.commands.serve import build_server
    from moa.eval.assets import shipped_adapters_dir
    from moa.serve.prompts import chat_prompt_ids
    from tests.serve.conftest import free_port

    port = free_port()
    token_gate = shipped_adapters_dir() / "token_router"
    args = build_parser().parse_args(["serve", "--router", str(token_gate), "--port", str(port),
                                      "--host", "127.0.0.1"])
    server, engine, app = build_server(args)
    model = engine.model
    assert model.router.level == "token"
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=600, max_retries=0)

        def ask(prompt: str):
            return client.chat.completions.create(model="auto", messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=MAX_TOKENS, temperature=0)

        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = [a.choices[0].message.content for a in pool.map(ask, PROMPTS)]
        expected = []
        for prompt in PROMPTS:
            ids = torch.tensor([chat_prompt_ids(model, [{"role": "user", "content": prompt}])])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                     do_sample=False, adapter_weights=["auto"])
            expected.append(model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    finally:
        server.should_exit = True
        thread.join(30)
        engine.shutdown(timeout=10, cancel=True)
    same = sum(a == e for a, e in zip(answers, expected, strict=True))
    assert same == len(PROMPTS), [(p, a, e) for p, a, e in zip(PROMPTS, answers, expected, strict=True) if a != e]
