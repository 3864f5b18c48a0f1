"""Hub sub-commands: ``push`` (an adapter or router folder) and ``pull`` (a repo or registry name)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from moa.errors import AdapterFormatError, RegistryError


def _metrics(pairs: list[str]) -> dict[str, float]:
    metrics = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            metrics[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise AdapterFormatError(f"--metric {pair!r} must look like NAME=NUMBER, e.g. --metric accuracy=0.82.")
    return metrics


def cmd_push(args: argparse.Namespace) -> int:
    """Push an adapter folder (adapter_config.json) or router folder (router_config.json)."""
    from moa.hub.pull import ROUTER_CONFIG_NAME
    from moa.hub.push import push_adapter_folder, push_router

    folder = Path(args.folder)
    _quiet(args)
    if (folder / ROUTER_CONFIG_NAME).is_file():
        result = push_router(folder, args.repo_id, revision=args.revision, private=args.private,
                             commit_message=args.message, license=args.license)
    else:
        result = push_adapter_folder(folder, args.repo_id, revision=args.revision, private=args.private,
                                     commit_message=args.message, domains=args.domain, license=args.license,
                                     metrics=_metrics(args.metric))
    print(f"pushed {folder} -> {result.repo_id}@{result.revision}")
    print(f"commit  {result.oid}")
    print(f"url     {result.commit_url}")
    for name, digest in sorted(result.files.items()):
        print(f"sha256  {digest}  {name}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    """Pull (and verify) an adapter, router or mixture repo, or a registered adapter by name."""
    from moa.hub.pull import fetch_verified

    _quiet(args)
    target = args.target
    if "/" not in target:  # a registry name: pinned commit (or shipped folder) and sha256s
        from moa.hub.registry import resolve

        entry = resolve(target)
        if args.revision:
            pinned = f"shipped with moa ({entry.source})" if entry.source else f"pinned to {entry.revision}"
            raise RegistryError(f"'{target}' is a registry name, {pinned}; drop --revision.")
        if entry.source is not None:  # shipped inside the moa package: verified, no network
            from moa.hub.pull import fetch_shipped

            shipped = fetch_shipped(entry.source, pinned=entry.files, out=args.out)
            print(f"verified shipped adapter {target} ({entry.source}, {len(shipped.files)} files, no download)")
            print(shipped.path)
            return 0
        pulled = fetch_verified(str(entry.repo), kind="adapter", revision=entry.revision, pinned=entry.files,
                                cache_dir=args.cache_dir)
        kind = "adapter"
    else:
        pulled, kind = _pull_any(target, args.revision, args.cache_dir, args.kind)
    print(f"pulled {kind} {pulled.repo_id} at commit {pulled.commit} ({len(pulled.files)} files verified)")
    folder = pulled.path
    if args.out:
        folder = _copy_out(pulled.path, pulled.files, Path(args.out))
    print(folder)
    return 0


def _pull_any(repo_id: str, revision: str | None, cache_dir: str | None, kind: str):
    """Pull as ``kind``, or for ``auto`` try adapter, mixture, router in turn."""
    from moa.hub.manifest import pull_mixture
    from moa.hub.pull import fetch_verified

    kinds = ["adapter", "mixture", "router"] if kind == "auto" else [kind]
    last: Exception | None = None
    for candidate in kinds:
        try:
            pulled = fetch_verified(repo_id, kind=candidate, revision=revision, cache_dir=cache_dir)
        except AdapterFormatError as error:  # lacks this kind's required files
            last = error
            continue
        if candidate == "mixture":
            manifest = pull_mixture(repo_id, revision=revision, cache_dir=cache_dir)
            for pin in manifest.adapters:
                print(f"  adapter {pin.name}: {pin.repo}@{pin.revision} verified -> {manifest.adapter_paths[pin.name]}")
            if manifest.router is not None:
                print(f"  router: {manifest.router.repo}@{manifest.router.revision} verified -> {manifest.router_path}")
        return pulled, candidate
    assert last is not None
    raise last


def _copy_out(source: Path, files: dict[str, str], out: Path) -> Path:
    """Copy the verified files (not cache symlinks) to ``out``, atomically."""
    from moa.atomic import atomic_directory

    with atomic_directory(out) as tmp:
        for name in files:
            shutil.copyfile(source / name, tmp / name)
    return out


def _quiet(args: argparse.Namespace) -> None:
    if getattr(args, "quiet", False):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``push`` and ``pull``."""
    push = sub.add_parser(
        "push",
        help="push an adapter (or router) folder to the Hugging Face Hub, one commit, with a model card",
        description=(
            "Pushes a PEFT adapter folder (adapter_config.json + adapter_model.safetensors [+ moa.json]) or a "
            "router folder (router_config.json + router.safetensors) to REPO_ID in one commit, with a "
            "generated README.md. Creates the repo and branch if needed; prints the commit and every file's "
            "sha256. Set HF_ENDPOINT / HF_TOKEN for the Hub to use."
        ),
    )
    push.add_argument("folder", help="adapter or router folder")
    push.add_argument("repo_id", help="Hub repo id, owner/name")
    push.add_argument("--revision", default=None, help="branch to push to (default main; created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--message", default=None, help="commit message")
    push.add_argument("--domain", action="append", default=[], help="domain for the model card (repeatable)")
    push.add_argument("--license", default=None, help="license id for the model card, e.g. apache-2.0")
    push.add_argument("--metric", action="append", default=[], help="eval number NAME=VALUE (repeatable)")
    push.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    push.set_defaults(func=cmd_push)

    pull = sub.add_parser(
        "pull",
        help="pull and verify an adapter, router or mixture from the Hub (or a registry name)",
        description=(
            "Pulls REPO_ID (owner/name) or a registry NAME and verifies it: safe file names, safetensors only, "
            "size and rank caps, every file's hash (and a mixture's pins). Works from the HF cache when "
            "HF_HUB_OFFLINE=1. A registry NAME shipped with moa (e.g. the demo adapters) is verified against "
            "its pinned sha256s without any network. Prints the verified local folder."
        ),
    )
    pull.add_argument("target", help="Hub repo id (owner/name) or a name from 'moa registry list'")
    pull.add_argument("--revision", default=None, help="branch, tag or commit (repo ids only)")
    pull.add_argument("--out", default=None, help="also copy the verified files to this folder")
    pull.add_argument("--cache-dir", default=None, help="Hugging Face cache folder")
    pull.add_argument("--kind", default="auto", choices=["auto", "adapter", "router", "mixture"],
                      help="what the repo holds (default: detect)")
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    pull.set_defaults(func=cmd_pull)
