"""Every adapter type in one batch of a live ``moa serve``: each answer equals ``model.generate`` of that row alone.

PEFT folders of VeRA, AdaLoRA, LoHa, LoKr, prompt tuning and prefix tuning (from their plugin
packages) and LoRA adapters are loaded at start-up; requests naming each of them, the base and
a mixture across Linear-level types are queued while the engine is held, then admitted
together (a mixed step, or a packed prefill) and decoded in one batch.
"""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from moa.testing import make_tiny_base, require_plugin
from tests.serve.conftest import engine_blocked, serving_stack, wait_until

for distribution, module in (("moa-vera", "moa_vera"), ("moa-adalora", "moa_adalora"),
                             ("moa-lycoris", "moa_lycoris"), ("moa-prompt-tuning", "moa_prompt_tuning")):
    require_plugin(distribution, module)
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
MAX_TOKENS = 8
REQUESTS = [
    ("sql", None), ("vera", None), ("adalora", None), ("loha", None), ("lokr", None), ("pt3", None),
    ("prefix4", None), ("tiny-base", None),
    ("tiny-base", {"adapter_weights": {"sql": 0.4, "vera": 0.3, "loha": 0.3}}),
    ("tiny-base", {"adapter_weights": {"pt3": 1.0, "adalora": 0.5}}),
]
PROMPTS = [f"row {i}: " + "klmnopq"[: 2 + i % 4] * (1 + i % 2) for i in range(len(REQUESTS))]


def peft_folders(root) -> dict:
    """PEFT folders of each type on the tiny base, none of them the identity."""
    configs = {
        "vera": peft.VeraConfig(r=8, target_modules=TARGETS),
        "adalora": peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=TARGETS,
                                      task_type="CAUSAL_LM"),
        "loha": peft.LoHaConfig(r=4, target_modules=TARGETS, init_weights=False),
        "lokr": peft.LoKrConfig(r=4, target_modules=TARGETS, init_weights=False),
        "pt3": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "prefix4": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }
    folders = {}
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(200 + seed)
        model = peft.get_peft_model(make_tiny_base(), config)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "vera_lambda" in key or "lora_E" in key:  # PEFT starts these at the identity
                    param.normal_(0.0, 0.5)
        model.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def offline(model, text: str, mixture: dict[str, float]) -> str:
    ids = torch.tensor([model.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=257, eos_token_id=256, adapter_weights=[mixture or None])
    return model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("mixed_steps", [True, False])
def test_every_adapter_type_admitted_together_answers_as_generate_alone(tmp_path, mixed_steps):
    with serving_stack(tmp_path, router=False, ranks={"sql": 4}, input_folders=peft_folders(tmp_path / "peft"),
                       max_batch_size=16, engine_options={"mixed_steps": mixed_steps}) as live:
        client = live.client(timeout=120)
        with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
            with engine_blocked(live.engine):
                futures = [pool.submit(client.completions.create, model=name, prompt=prompt, max_tokens=MAX_TOKENS,
                                       temperature=0, extra_body=extra)
                           for (name, extra), prompt in zip(REQUESTS, PROMPTS, strict=True)]
                wait_until(lambda: live.engine.stats()["queued"] == len(REQUESTS), timeout=30, what="queued requests")
            answers = [f.result(timeout=120).choices[0].text for f in futures]
        kinds = {name: config.peft_type for name, config in live.model.peft_config.items()}
        assert {"VERA", "ADALORA", "LOHA", "LOKR", "PROMPT_TUNING", "PREFIX_TUNING", "LORA"} <= set(kinds.values())
        base = offline(live.model, PROMPTS[0], {})
        for ((name, extra), prompt), answer in zip(zip(REQUESTS, PROMPTS, strict=True), answers, strict=True):
            mixture = dict(extra["adapter_weights"]) if extra else ({} if name == "tiny-base" else {name: 1.0})
            assert answer == offline(live.model, prompt, mixture), (name, extra)
        assert {offline(live.model, PROMPTS[0], {name: 1.0}) for name in kinds} != {base}  # adapters change answers
