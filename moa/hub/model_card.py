"""Model cards (``README.md``) for the adapter, router and mixture repos moa pushes.

Each card starts with YAML metadata the Hub understands, written with
``huggingface_hub.ModelCardData``: ``base_model`` (when the base is a Hub id),
``library_name`` (``peft`` for adapters, so the Hub shows PEFT's loading snippet; ``moa``
for routers and mixtures), ``tags`` (always ``moa``), ``license``, ``domains``, eval
numbers as ``model-index`` when known, and a ``moa`` block (base fingerprint, adapter
type, version). The body says what the repo holds and how to load it with moa and PEFT.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import moa

if TYPE_CHECKING:
    from moa.hub.manifest import MixtureManifest

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _front_matter(
    *,
    repo_id: str,
    library_name: str,
    base_model: str | None,
    tags: Sequence[str],
    license: str | None,  # noqa: A002 - the Hub's key
    domains: Sequence[str],
    metrics: Mapping[str, float] | None,
    moa_block: Mapping[str, Any],
) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    extra: dict[str, Any] = {"moa": dict(moa_block)}
    if domains:
        extra["domains"] = list(domains)
    eval_results = None
    if metrics:
        eval_results = [
            EvalResult(
                task_type="text-generation",
                dataset_type="moa-eval",
                dataset_name=f"moa eval ({', '.join(domains) or 'held-out'})",
                metric_type=str(name),
                metric_value=float(value),
            )
            for name, value in sorted(metrics.items())
        ]
    data = ModelCardData(
        base_model=base_model if base_model and _HUB_ID.match(base_model) else None,
        library_name=library_name,
        license=license,
        tags=list(dict.fromkeys(["moa", *tags, *domains])),
        pipeline_tag="text-generation",
        model_name=repo_id if eval_results else None,
        eval_results=eval_results,
        **extra,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _files_table(files: Mapping[str, str] | None) -> str:
    if not files:
        return ""
    rows = "\n".join(f"| `{name}` | `{digest}` |" for name, digest in sorted(files.items()))
    return f"\n## Files\n\n| file | sha256 |\n|---|---|\n{rows}\n"


def render_adapter_card(
    *,
    repo_id: str,
    config: Mapping[str, Any],
    base: Mapping[str, Any],
    adapter_type: str = "lora",
    domains: Sequence[str] = (),
    license: str | None = None,  # noqa: A002
    metrics: Mapping[str, float] | None = None,
    files: Mapping[str, str] | None = None,
    description: str | None = None,
) -> str:
    """The README.md of an adapter repo.

    Args:
        repo_id: Where it is pushed (``owner/name``), used in the usage snippets.
        config: The saved ``adapter_config.json``.
        base: :func:`moa.model.base_loading.describe_base` of the base it was made on.
        adapter_type: moa adapter type (``lora``, ``ia3``...).
        domains: Domains it is trained for (e.g. ``["sql"]``).
        license: Hub license id (e.g. ``apache-2.0``); omitted from the card when ``None``.
        metrics: Eval numbers (name -> value), written as ``model-index`` when given.
        files: File name -> sha256 of the other files pushed with it.
        description: One paragraph on what it does.
    """
    base_id = str(base.get("model_id") or config.get("base_model_name_or_path") or "")
    name = repo_id.rsplit("/", 1)[-1]
    yaml = _front_matter(
        repo_id=repo_id, library_name="peft", base_model=base_id, tags=["peft", adapter_type, "adapter"],
        license=license, domains=domains, metrics=metrics,
        moa_block={"adapter_type": adapter_type, "base_fingerprint": base.get("fingerprint"),
                   "quantization": base.get("quantization"), "version": moa.__version__},
    )
    targets = config.get("target_modules")
    targets_text = ", ".join(targets) if isinstance(targets, list) else str(targets)
    metrics_text = "".join(f"| {k} | {v:.4g} |\n" for k, v in sorted((metrics or {}).items()))
    return f"""{yaml}
# {name}

{description or f"A {adapter_type} adapter for `{base_id or 'its base model'}`"}{f" (domains: {', '.join(domains)})" if domains else ""}, published with moa in PEFT's format: `adapter_config.json` + `adapter_model.safetensors` (no pickle).

| | |
|---|---|
| base model | `{base_id or '?'}` |
| base fingerprint | `{base.get('fingerprint') or '?'}` |
| quantization at training | `{base.get('quantization') or 'none'}` |
| adapter type | `{adapter_type}` (PEFT type `{config.get('peft_type', '?')}`) |
| rank / alpha | {config.get('r', '-')} / {config.get('lora_alpha', '-')} |
| target modules | {targets_text} |
{f"{chr(10)}## Evaluation{chr(10)}{chr(10)}| metric | value |{chr(10)}|---|---|{chr(10)}{metrics_text}" if metrics else ""}
## Use with moa

```python
import moa

model = moa.MixtureModel.from_pretrained("{base_id or 'default'}", quantization="nf4")
model.load_adapter("{repo_id}", adapter_name="{_slot_name(name)}")   # verified pull: names, sha256, rank cap
out = model(input_ids, adapter_names=["{_slot_name(name)}"] * len(input_ids))
```

or from the command line: `moa pull {repo_id}`.

## Use with PEFT

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base_id or '<base model>'}")
model = PeftModel.from_pretrained(base, "{repo_id}")
```

moa checks the base fingerprint above when loading; PEFT does not, so load it on the same base.
{_files_table(files)}"""


def render_router_card(
    *, repo_id: str, config: Mapping[str, Any], files: Mapping[str, str] | None = None,
    license: str | None = None,  # noqa: A002
) -> str:
    """The README.md of a router repo (``router_config.json`` + ``router.safetensors``)."""
    from moa.hub.pull import router_type_of

    router_type = router_type_of(config) or "router"
    yaml = _front_matter(
        repo_id=repo_id, library_name="moa", base_model=None, tags=["router", router_type], license=license,
        domains=[], metrics=None, moa_block={"kind": "router", "router_type": router_type, "version": moa.__version__},
    )
    return f"""{yaml}
# {repo_id.rsplit('/', 1)[-1]}

A moa router (`{router_type}`): it decides per request which adapters to apply and with what weights.

```python
from moa.hub import pull_router, load_router_folder

router = load_router_folder(pull_router("{repo_id}"))
model.set_router(router)
```
{_files_table(files)}"""


def render_mixture_card(
    manifest: MixtureManifest, *, repo_id: str, license: str | None = None,  # noqa: A002
) -> str:
    """The README.md of a mixture repo: the base, every pinned adapter and the router."""
    base = manifest.base
    yaml = _front_matter(
        repo_id=repo_id, library_name="moa", base_model=base.model_id, tags=["mixture", "lora"],
        license=license, domains=[], metrics=None,
        moa_block={"kind": "mixture", "base_fingerprint": base.fingerprint, "quantization": base.quantization,
                   "version": moa.__version__},
    )
    rows = "\n".join(f"| `{a.name}` | `{a.repo}` | `{a.revision[:12]}` | {len(a.files)} |"
                     for a in manifest.adapters)
    router = (f"Router: `{manifest.router.repo}` at `{manifest.router.revision[:12]}`.\n"
              if manifest.router else "No router: choose adapters per row with `adapter_names=`.\n")
    return f"""{yaml}
# {repo_id.rsplit('/', 1)[-1]}

A moa mixture: adapters over one base, each pinned to a commit and the sha256 of every file
(`moa_mixture.json`). Pulling verifies every pin and the base fingerprint before loading anything.

Base: `{base.model_id}` (fingerprint `{base.fingerprint}`, quantization `{base.quantization or 'none'}`).

| adapter | repo | commit | files |
|---|---|---|---|
{rows}

{router}
```python
import moa
from moa.hub import pull_mixture

model = moa.MixtureModel.from_pretrained("{base.model_id or 'default'}", quantization="nf4")
manifest = pull_mixture("{repo_id}", model=model)   # all adapters verified, then loaded
```
"""


def render_pretrained_card(
    *,
    repo_id: str,
    adapters: Mapping[str, tuple[str, Mapping[str, Any]]],
    base: Mapping[str, Any],
    active: Sequence[str] = (),
    license: str | None = None,  # noqa: A002
    description: str | None = None,
    files: Mapping[str, str] | None = None,
) -> str:
    """The README.md of a multi-adapter repo (``save_pretrained`` layout, see :mod:`moa.hub.pretrained`).

    Args:
        repo_id: Where it is pushed (``owner/name``), used in the usage snippets.
        adapters: Adapter name -> (its folder in the repo, ``"."`` for the root; its ``adapter_config.json``),
            the root adapter first.
        base: ``moa.json``'s ``base`` block (``model_id``, ``fingerprint``, ``quantization``) of the adapters.
        active: The adapters that were active when saved.
        license: Hub license id; omitted when ``None``.
        description: One paragraph on what the adapters do.
        files: File name -> sha256 of the files pushed with it.
    """
    names = list(adapters)
    base_id = str(base.get("model_id") or next(
        (c.get("base_model_name_or_path") for _, c in adapters.values() if c.get("base_model_name_or_path")), ""))
    types = sorted({str(c.get("peft_type", "?")).lower() for _, c in adapters.values()})
    yaml = _front_matter(
        repo_id=repo_id, library_name="peft", base_model=base_id, tags=["peft", *types, "adapter", "multi-adapter"],
        license=license, domains=[], metrics=None,
        moa_block={"kind": "multi-adapter", "adapters": names, "base_fingerprint": base.get("fingerprint"),
                   "quantization": base.get("quantization"), "version": moa.__version__},
    )
    rows = []
    for name, (folder, config) in adapters.items():
        targets = config.get("target_modules")
        targets_text = ", ".join(targets) if isinstance(targets, list) else str(targets)
        where = "(root)" if folder == "." else f"`{folder}/`"
        rows.append(f"| `{name}` | {where} | `{config.get('peft_type', '?')}` | {config.get('r', '-')} / "
                    f"{config.get('lora_alpha', '-')} | {targets_text} |")
    first = names[0]
    others = [(n, f) for n, (f, _) in adapters.items() if n != first]
    peft_loads = "".join(f'model.load_adapter("{repo_id}", adapter_name="{n}", subfolder="{f}")\n' for n, f in others)
    first_folder = adapters[first][0]
    root_kwargs = f', adapter_name="{first}"' + ("" if first_folder == "." else f', subfolder="{first_folder}"')
    return f"""{yaml}
# {repo_id.rsplit('/', 1)[-1]}

{description or f"{len(names)} adapters for `{base_id or 'one base model'}`"}, published with moa in PEFT's multi-adapter layout: the first adapter at the root, each other one in a subfolder named after it; every folder holds `adapter_config.json` + `adapter_model.safetensors` (no pickle). `moa_adapters.json` lists the adapters, their folders and the sha256 of every file.

| adapter | folder | type | rank / alpha | target modules |
|---|---|---|---|---|
{chr(10).join(rows)}

Base: `{base_id or '?'}` (fingerprint `{base.get('fingerprint') or '?'}`, quantization at training `{base.get('quantization') or 'none'}`).{f" Active when saved: {', '.join(f'`{a}`' for a in active)}." if active else ""}

## Use with moa

```python
import moa
from moa.hub.pretrained import load_pretrained_adapters

model = moa.MixtureModel.from_pretrained("{base_id or 'default'}", quantization="nf4")
load_pretrained_adapters(model, "{repo_id}")   # verified pull (every file's sha256), all adapters or none
out = model(input_ids, adapter_names=["{first}"] * len(input_ids))
```

## Use with PEFT

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base_id or '<base model>'}")
model = PeftModel.from_pretrained(base, "{repo_id}"{root_kwargs})
{peft_loads}model.set_adapter("{first}")
```

moa checks the base fingerprint above when loading; PEFT does not, so load them on the same base.
{_files_table(files)}"""


def _slot_name(repo_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", repo_name) or "adapter"


def read_card_metadata(text: str) -> dict[str, Any]:
    """The YAML metadata of a model card as a dict (empty when it has none)."""
    from huggingface_hub import ModelCard

    return ModelCard(text).data.to_dict()


__all__ = [
    "read_card_metadata",
    "render_adapter_card",
    "render_mixture_card",
    "render_pretrained_card",
    "render_router_card",
]
