"""A Hugging Face Hub-compatible HTTP server for tests (standard library only).

It speaks the subset of the Hub protocol that ``huggingface_hub`` 2.x uses to create
repos, push commits (inline base64 files, or LFS objects through the batch API with
single-part or multipart upload and verify), list files, refs and repo info, and
download files (``/resolve`` with ``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag`` and
``X-Linked-Size``). It listens on 127.0.0.1 only, holds everything in memory
(:mod:`tests.hub.storage`), caps request bodies, and logs every request so tests can
assert on the traffic.

Tests plan faults with ``storage.add_fault(kind, method=..., path=..., times=...)``
(:data:`tests.hub.storage.FAULT_KINDS`): error statuses, connection resets (before, after
or in the middle of a response), bodies shorter than their Content-Length, hangs, and
wrong sizes or hashes in the download headers or the file listing.

Run it by hand with ``python -m tests.hub.server --port 8765`` and point a client at it
with ``HF_ENDPOINT=http://127.0.0.1:8765 HF_HUB_DISABLE_XET=1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from tests.hub.storage import Commit, Fault, FileEntry, HubStorage, StorageError

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
MAX_BODY_BYTES = 96 * 1024 * 1024
_TRUE = ("1", "true", "True")


class HubRequestHandler(BaseHTTPRequestHandler):
    """One request; routes on method and path to the ``_api_*`` / ``_lfs_*`` methods."""

    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a client may stay silent on a socket
    server: HubServer

    # -- plumbing --------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        logger.debug("hub-server: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.segments = [unquote(s) for s in url.path.split("/")[1:]]
        self.storage.requests.append((method, url.path))
        self._fault: Fault | None = None
        try:
            self._body = self._read_body()
            self._fault = self.storage.take_fault(method, url.path)
            if self._fault is not None and self._inject_before(self._fault):
                return
            self._route(method, self.segments)
            if self._fault is not None and self._fault.kind == "reset-after":
                self._reset()
        except StorageError as error:
            self._error(error.status, error.message, error.code, error.commit)
        except (KeyError, ValueError, IndexError, json.JSONDecodeError) as error:
            self._error(400, f"Bad request: {type(error).__name__}: {error}")

    @property
    def storage(self) -> HubStorage:
        return self.server.storage

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.server.server_address[1]}"

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            for _ in range(1_000_000):  # bounded: at most a million chunks
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY_BYTES:
                    raise StorageError(413, "Request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            raise StorageError(400, "Too many chunks")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise StorageError(413, "Request body too large")
        return self.rfile.read(length) if length else b""

    # -- faults (planned by tests through HubStorage.add_fault) ----------------------------

    def _inject_before(self, fault: Fault) -> bool:
        """Inject a fault that replaces the answer; ``True`` when nothing more may be sent."""
        logger.info("hub-server: injecting %s on %s %s", fault.kind, self.command, self.path)
        if fault.kind == "status":
            self._error(fault.status, f"Injected fault: HTTP {fault.status}")
            self.close_connection = True
            return True
        if fault.kind == "reset":
            self._reset()
            return True
        if fault.kind == "hang":
            self.storage.wake.wait(min(fault.seconds, 120.0))
            self.close_connection = True
            self.connection.close()
            return True
        return False

    def _reset(self) -> None:
        """Abort the connection with a TCP RST (what a crashed proxy or a cut network looks like)."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.connection.close()

    def _send_broken_body(self, body: bytes) -> None:
        """Send half of ``body`` after headers announcing all of it, then reset or close."""
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        time.sleep(0.2)  # let the client read the headers and the first bytes before the cut
        if self._fault is not None and self._fault.kind == "reset-body":
            self._reset()
        else:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _json_body(self) -> Any:
        return json.loads(self._body or b"{}")

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if self._fault is not None and self._fault.kind in ("reset-body", "short-body") and body:
            self._send_broken_body(body)
        else:
            self.wfile.write(body)

    def _json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None, commit: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._json({"error": message}, status, headers)

    # -- routing ---------------------------------------------------------------------------

    def _route(self, method: str, seg: list[str]) -> None:
        if seg[:1] == ["api"]:
            return self._route_api(method, seg[1:])
        if seg[:1] == ["_lfs"]:
            return self._route_lfs(method, seg[1:])
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        if len(seg) == 6 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{seg[0]}/{seg[1][:-4]}")
        raise StorageError(404, f"No route for {method} /{'/'.join(seg)}")

    def _route_api(self, method: str, seg: list[str]) -> None:
        if seg == ["validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if seg == ["repos", "delete"] and method == "DELETE":
            body = self._json_body()
            self.storage.delete_repo(f"{body['organization']}/{body['name']}")
            return self._json({})
        if len(seg) < 3 or seg[0] != "models":
            raise StorageError(404, f"No API route for {method} /api/{'/'.join(seg)}")
        repo_id, rest = f"{seg[1]}/{seg[2]}", seg[3:]
        head = rest[0] if rest else None
        if method == "GET" and head is None:
            return self._model_info(repo_id, "main")
        if method == "GET" and head == "revision" and len(rest) == 2:
            return self._model_info(repo_id, rest[1])
        if method == "GET" and head == "tree" and len(rest) >= 2:
            return self._tree(repo_id, rest[1], "/".join(rest[2:]))
        if method == "GET" and head == "refs":
            return self._refs(repo_id)
        if method == "POST" and head == "preupload" and len(rest) == 2:
            return self._preupload(repo_id, rest[1])
        if method == "POST" and head == "commit" and len(rest) == 2:
            return self._commit(repo_id, rest[1])
        if head == "branch" and len(rest) == 2 and method in ("POST", "DELETE"):
            if method == "POST":
                self.storage.create_branch(repo_id, rest[1], self._json_body().get("startingPoint"))
            else:
                self.storage.delete_branch(repo_id, rest[1])
            return self._json({})
        if method == "POST" and head == "tag" and len(rest) == 2:
            self.storage.create_tag(repo_id, rest[1], self._json_body()["tag"])
            return self._json({})
        raise StorageError(404, f"No API route for {method} /api/{'/'.join(seg)}")

    # -- repo API --------------------------------------------------------------------------

    def _validate_yaml(self) -> None:
        import yaml  # a dependency of huggingface_hub

        content = self._json_body().get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        errors = []
        if match:
            try:
                data = yaml.safe_load(match.group(1))
                if data is not None and not isinstance(data, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as error:
                errors.append({"message": f"invalid YAML: {error}"})
        self._json({"errors": errors, "warnings": []}, 400 if errors else 200)

    def _create_repo(self) -> None:
        body = self._json_body()
        if body.get("type", "model") != "model":
            raise StorageError(400, "The test Hub only hosts model repos")
        repo_id = f"{body['organization']}/{body['name']}"
        if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo_id):
            raise StorageError(400, f"Invalid repo id {repo_id!r}")
        private = body.get("visibility") == "private" or bool(body.get("private"))
        try:
            self.storage.create_repo(repo_id, private=private)
        except StorageError as error:
            if error.status == 409:
                return self._json({"error": error.message, "url": f"{self.endpoint}/{repo_id}"}, 409)
            raise
        self._json({"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

    def _model_info(self, repo_id: str, revision: str) -> None:
        repo = self.storage.repo(repo_id)
        commit = self.storage.resolve(repo_id, revision)
        blobs = self.query.get("blobs") in _TRUE
        siblings = []
        for entry in sorted(commit.files.values(), key=lambda e: e.path):
            entry = self._listed(entry)
            sibling: dict[str, Any] = {"rfilename": entry.path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.blob_id)
                if entry.lfs_sha256:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.lfs_sha256,
                                      "pointerSize": entry.pointer_size()}
            siblings.append(sibling)
        self._json({
            "_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
            "sha": commit.sha, "private": repo.private, "disabled": False, "gated": False,
            "lastModified": _iso(commit.date), "createdAt": _iso(commit.date), "tags": [],
            "downloads": 0, "likes": 0, "library_name": None, "siblings": siblings,
        })

    def _tree(self, repo_id: str, revision: str, path: str) -> None:
        commit = self.storage.resolve(repo_id, revision)
        recursive = self.query.get("recursive") in _TRUE
        prefix = f"{path.rstrip('/')}/" if path else ""
        if path and path in commit.files:
            raise StorageError(400, f"{path} is a file, not a folder")
        items, folders = [], set()
        for entry in sorted(commit.files.values(), key=lambda e: e.path):
            if not entry.path.startswith(prefix):
                continue
            rest = entry.path[len(prefix):]
            parts = rest.split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                items.append(_tree_file(self._listed(entry), commit))
        if path and not items and not folders:
            raise StorageError(404, f"{path} does not exist at {revision}", "EntryNotFound", commit.sha)
        items += [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]
        self._json(items)

    def _listed(self, entry: FileEntry) -> FileEntry:
        """``entry`` as the listing shows it: changed by a ``wrong-listing-*`` fault."""
        fault = self._fault
        if fault is None or not fault.kind.startswith("wrong-listing") or fault.file not in (None, entry.path):
            return entry
        if fault.kind == "wrong-listing-size":
            return dataclasses.replace(entry, size=entry.size + 7)
        if entry.lfs_sha256:
            return dataclasses.replace(entry, lfs_sha256=_other_hash(entry.lfs_sha256))
        return dataclasses.replace(entry, blob_id=_other_hash(entry.blob_id))

    def _refs(self, repo_id: str) -> None:
        repo = self.storage.repo(repo_id)

        def refs(kind: str, table: dict[str, str]) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c} for n, c in sorted(table.items())]

        self._json({"branches": refs("heads", repo.branches), "tags": refs("tags", repo.tags),
                    "converts": [], "pullRequests": []})

    def _preupload(self, repo_id: str, revision: str) -> None:
        current: dict[str, FileEntry] = {}
        repo = self.storage.repo(repo_id)
        if revision in repo.branches:
            current = self.storage.resolve(repo_id, revision).files
        answer = []
        for item in self._json_body()["files"]:
            mode = self.storage.upload_mode_for(item["path"], int(item["size"]))
            entry = current.get(item["path"])
            oid = None
            if entry is not None and (entry.lfs_sha256 is not None) == (mode == "lfs"):
                oid = entry.lfs_sha256 or entry.blob_id
            answer.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json({"files": answer, "commitOid": repo.branches.get(revision)})

    def _commit(self, repo_id: str, revision: str) -> None:
        lines = [json.loads(line) for line in self._body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise StorageError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        commit = self.storage.commit(repo_id, revision, header["summary"], lines[1:], header.get("parentCommit"))
        self._json({"success": True, "commitOid": commit.sha,
                    "commitUrl": f"{self.endpoint}/{repo_id}/commit/{commit.sha}", "pullRequestUrl": None})

    # -- downloads -------------------------------------------------------------------------

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        commit = self.storage.resolve(repo_id, revision)
        entry = commit.files.get(path)
        if entry is None:
            raise StorageError(404, f"Entry not found: {path}", "EntryNotFound", commit.sha)
        data = self.storage.blobs[entry.blob_key]
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{entry.etag}"', "Accept-Ranges": "bytes",
                   "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"'}
        if entry.lfs_sha256:
            headers.update({"X-Linked-Etag": f'"{entry.lfs_sha256}"', "X-Linked-Size": str(entry.size)})
        status, match = 200, re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and int(match.group(1)) < len(data):
            status, data = 206, data[int(match.group(1)):]
        kind = self._fault.kind if self._fault is not None else None
        if kind == "wrong-etag":
            key = "X-Linked-Etag" if entry.lfs_sha256 else "ETag"
            headers[key] = f'"{_other_hash(entry.etag)}"'
        if kind == "wrong-size" and entry.lfs_sha256:
            headers["X-Linked-Size"] = str(entry.size + 7)
        elif kind == "wrong-size" and self.command == "HEAD":
            data += b"\0" * 7  # HEAD sends no body: only the Content-Length it announces is wrong
        self._send(status, data, headers, content_type="application/octet-stream")

    # -- LFS -------------------------------------------------------------------------------

    def _lfs_batch(self, repo_id: str) -> None:
        self.storage.repo(repo_id)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise StorageError(400, "The test Hub's LFS batch API only takes uploads")
        objects = []
        for obj in body["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not self.storage.has_lfs(oid):
                upload: dict[str, Any] = {"href": f"{self.endpoint}/_lfs/upload/{oid}/{size}"}
                chunk = self.storage.multipart_chunk
                if size > chunk:
                    count = -(-size // chunk)
                    upload["header"] = {"chunk_size": str(chunk), **{
                        str(n): f"{self.endpoint}/_lfs/part/{oid}/{n}" for n in range(1, count + 1)}}
                answer["actions"] = {"upload": upload, "verify": {"href": f"{self.endpoint}/_lfs/verify"}}
            objects.append(answer)
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _route_lfs(self, method: str, seg: list[str]) -> None:
        if method == "PUT" and seg[:1] == ["upload"] and len(seg) == 3:
            if len(self._body) != int(seg[2]):
                raise StorageError(400, f"Uploaded {len(self._body)} bytes, announced {seg[2]}")
            self.storage.put_lfs(seg[1], self._body)
            return self._json({})
        if method == "PUT" and seg[:1] == ["part"] and len(seg) == 3:
            with self.storage.lock:
                self.storage.parts[(seg[1], int(seg[2]))] = self._body
            return self._send(200, b"", {"ETag": f'"part-{seg[2]}-{len(self._body)}"'})
        if method == "POST" and seg[:1] == ["upload"] and len(seg) == 3:
            parts = self._json_body()["parts"]
            with self.storage.lock:
                data = b"".join(self.storage.parts.pop((seg[1], int(p["partNumber"]))) for p in parts)
            self.storage.put_lfs(seg[1], data)
            return self._json({})
        if method == "POST" and seg == ["verify"]:
            body = self._json_body()
            if not self.storage.has_lfs(body["oid"]):
                raise StorageError(404, f"LFS object {body['oid']} not found")
            return self._json({})
        raise StorageError(404, f"No LFS route for {method} /_lfs/{'/'.join(seg)}")


def _tree_file(entry: FileEntry, commit: Commit) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "file", "path": entry.path, "size": entry.size, "oid": entry.blob_id,
                            "lastCommit": {"id": commit.sha, "title": commit.message, "date": _iso(commit.date)}}
    if entry.lfs_sha256:
        item["lfs"] = {"oid": entry.lfs_sha256, "size": entry.size, "pointerSize": entry.pointer_size()}
    return item


def _other_hash(value: str) -> str:
    """A hash of the same length as ``value`` that differs from it (what a wrong listing shows)."""
    return hashlib.sha256(value.encode()).hexdigest()[: len(value)]


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(timestamp))


class HubServer(ThreadingHTTPServer):
    """The test Hub on ``127.0.0.1:port`` (0 = any free port), served from a daemon thread.

    Args:
        port: TCP port on 127.0.0.1.
        storage: Where repos live (a fresh in-memory one by default).
        max_lifetime_s: The server shuts itself down after this long, whatever happens.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int = 0, storage: HubStorage | None = None, max_lifetime_s: float = 3600.0):
        super().__init__((HOST, port), HubRequestHandler)
        self.storage = storage or HubStorage()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="hub-test-server", daemon=True)
        self._deadline = threading.Timer(max_lifetime_s, self.shutdown)
        self._deadline.daemon = True

    @property
    def endpoint(self) -> str:
        """Base URL of the server (what ``HF_ENDPOINT`` must be)."""
        return f"http://{HOST}:{self.server_address[1]}"

    def start(self) -> HubServer:
        self._thread.start()
        self._deadline.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent); ends every injected hang."""
        self._deadline.cancel()
        self.storage.clear_faults()
        if self._thread.is_alive():
            self.shutdown()
            self._thread.join(timeout=10)
        self.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the Hub test server on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--mode", choices=["lfs", "inline"], default="lfs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG)
    server = HubServer(args.port, HubStorage(args.mode))
    print(f"HF_ENDPOINT={server.endpoint}")  # noqa: T201 - command-line use
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()


if __name__ == "__main__":
    main()
