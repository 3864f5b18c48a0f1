"""Publishing to and pulling from the Hugging Face Hub: adapters, routers, whole mixtures.

Pushes are one commit each, with a generated model card. Pulls are verified: safe file
names, safetensors only, size and rank caps, and every file's hash against the Hub's
listing and (for mixtures) the manifest's pins; a mismatch raises and loads nothing.
``huggingface_hub`` is imported on first use; it reads ``HF_ENDPOINT``,
``HF_HUB_DISABLE_XET`` (and ``HF_HUB_OFFLINE``) at import time.

Example::

    import moa
    result = moa.push_adapter(model, "sql", "alice/sql-lora", domains=["sql"])
    folder = moa.pull_adapter("alice/sql-lora", revision=result.oid)
    moa.push_mixture(model, "alice/sql-code", adapters={"sql": "alice/sql-lora", "code": "alice/code-lora"})
    manifest = moa.pull_mixture("alice/sql-code", model=other_model)
    moa.hub.save_pretrained(model, "out/all")              # PEFT's multi-adapter layout, one folder
    moa.hub.push_to_hub(model, "alice/all-adapters")       # the same layout, one commit
"""

from __future__ import annotations

from moa.hub.manifest import AdapterPin, BaseSpec, MixtureManifest, RouterPin, pull_mixture, push_mixture
from moa.hub.pull import PulledRepo, fetch_verified, load_router_folder, pull_adapter, pull_router
from moa.hub.pretrained import load_pretrained_adapters, pull_pretrained, push_to_hub, save_pretrained
from moa.hub.push import PushResult, push_adapter, push_adapter_folder, push_router
from moa.hub.verify import Limits

__all__ = [
    "AdapterPin",
    "BaseSpec",
    "Limits",
    "MixtureManifest",
    "PulledRepo",
    "PushResult",
    "RouterPin",
    "fetch_verified",
    "load_pretrained_adapters",
    "load_router_folder",
    "pull_adapter",
    "pull_mixture",
    "pull_pretrained",
    "pull_router",
    "push_adapter",
    "push_adapter_folder",
    "push_mixture",
    "push_router",
    "push_to_hub",
    "save_pretrained",
]
