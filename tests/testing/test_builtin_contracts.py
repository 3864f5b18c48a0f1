"""moa.testing's contract suites run against the built-ins: the LoRA type and the fixed router."""

from __future__ import annotations

import pytest

from moa.routing import FixedRouter
from moa.testing import AdapterTypeContract, RouterContract


class TestLoraContract(AdapterTypeContract):
    adapter_type = "lora"
    config_kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    bad_config_kwargs = (
        {"target_modules": []},
        {"target_modules": ["no_such_module"]},
        {"r": 0},
        {"use_dora": True},
        {"init_lora_weights": "olora"},
    )


class TestFixedRouterContract(RouterContract):
    router_name = "fixed"

    @pytest.fixture
    def router(self) -> FixedRouter:
        return FixedRouter({"alpha": 0.7, "gamma": 0.3})
