"""The Hub test server answers like the Hub where huggingface_hub looks (headers, errors, refs)."""

from __future__ import annotations

import httpx2
import pytest
from huggingface_hub import CommitOperationAdd, HfApi, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError


def test_headers_tree_refs_and_errors(hub):
    api = HfApi()
    api.create_repo("bob/r")
    info = api.create_commit("bob/r", commit_message="c", operations=[
        CommitOperationAdd("w.safetensors", b"\0" * 64), CommitOperationAdd("sub/dir/a.json", b"{}")])
    meta = get_hf_file_metadata(hf_hub_url("bob/r", "w.safetensors"))
    assert meta.commit_hash == info.oid and len(meta.etag) == 64 and meta.size == 64  # LFS: sha256 etag
    head = httpx2.head(hf_hub_url("bob/r", "sub/dir/a.json"))
    assert head.headers["X-Repo-Commit"] == info.oid and "X-Linked-Etag" not in head.headers
    top = {(type(e).__name__, e.path) for e in api.list_repo_tree("bob/r")}
    assert top == {("RepoFile", ".gitattributes"), ("RepoFile", "w.safetensors"), ("RepoFolder", "sub")}
    assert "sub/dir/a.json" in api.list_repo_files("bob/r", revision=info.oid)
    assert api.file_exists("bob/r", "w.safetensors") and not api.file_exists("bob/r", "nope")
    with pytest.raises(RemoteEntryNotFoundError):
        get_hf_file_metadata(hf_hub_url("bob/r", "nope"))
    with pytest.raises(RevisionNotFoundError):
        api.model_info("bob/r", revision="nope")
    api.create_branch("bob/r", branch="dev")
    api.create_tag("bob/r", tag="t1", revision="dev")
    refs = api.list_repo_refs("bob/r")
    assert {b.name for b in refs.branches} == {"main", "dev"} and [t.name for t in refs.tags] == ["t1"]
    api.delete_repo("bob/r")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("bob/r")
    assert all(method in ("GET", "HEAD", "POST", "PUT", "DELETE") for method, _ in hub.storage.requests)
