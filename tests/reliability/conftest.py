"""Fuzzing set-up: hypothesis profiles, the tiny model and adapter folders every fuzz suite uses.

CI mode (the default): profile ``moa-ci``, derandomized (the same examples on every run, no
example database), with each suite's fixed example budget, about two minutes for every fuzz
suite together on a 2-core machine. Locally, ``MOA_FUZZ_EXAMPLES=2000`` runs that many random
examples per fuzz test instead (profile ``moa-local``, not derandomized).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

import moa
from moa.testing.fixtures import make_tiny_model

_COMMON = dict(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("moa-ci", derandomize=True, **_COMMON)
settings.register_profile("moa-local", derandomize=False, **_COMMON)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Thousands of tiny forwards: one intra-op thread is ~100x faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fuzz_model(tiny_base_dir):
    """One tiny MixtureModel per fuzz module, holding adapter 'good' (r=2 on q_proj and v_proj)."""
    torch.manual_seed(0)
    model = make_tiny_model(tiny_base_dir)
    model.add_adapter("good", moa.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model


@pytest.fixture(scope="module")
def adapter_template(fuzz_model, tmp_path_factory):
    """A valid adapter folder (PEFT layout + moa.json) saved from the fuzz model, to copy and damage."""
    torch.manual_seed(1)
    fuzz_model.add_adapter("src", moa.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    folder = tmp_path_factory.mktemp("fuzz-template") / "src"
    fuzz_model.save_adapter("src", folder)
    fuzz_model.delete_adapter("src")
    return folder
