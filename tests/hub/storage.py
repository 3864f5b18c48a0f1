"""In-memory git-like storage behind the Hub test server (:mod:`tests.hub.server`).

It models what the Hugging Face Hub keeps per model repo: commits (each a full file
table), branches and tags pointing at commits, and content-addressed blobs (regular
files by their git blob sha1, LFS files by their sha256). Test helpers can break it on
purpose: :meth:`HubStorage.tamper` serves other bytes under a file's recorded hashes,
:meth:`HubStorage.inject_file` commits a raw path without any validation, and
:meth:`HubStorage.add_fault` plans HTTP faults (see :class:`Fault`) that the server injects.
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field

LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
LFS_PATTERNS = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt", ".gguf", ".h5", ".zip")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub sends files >= 10 MB through LFS
MAX_STORED_BYTES = 512 * 1024 * 1024  # the test server refuses to hold more than this


#: What a :class:`Fault` does to a matching request (the server reads the request body first).
FAULT_KINDS = {
    "status": "answer HTTP ``status`` (e.g. 500, 503) with an error body instead of serving",
    "reset": "answer nothing and reset the connection (TCP RST)",
    "reset-after": "process the request (e.g. apply a commit), then reset instead of answering",
    "reset-body": "send the headers and half the body, then reset the connection",
    "short-body": "send the headers and half the body, then close: fewer bytes than Content-Length",
    "hang": "answer nothing for ``seconds``, then close the connection",
    "wrong-size": "advertise a wrong size (X-Linked-Size for LFS files, else Content-Length on HEAD)",
    "wrong-etag": "advertise a wrong ETag / X-Linked-Etag (a hash the content does not have)",
    "wrong-listing-hash": "list ``file`` with a wrong sha256 (LFS) or git blob id in model info / tree",
    "wrong-listing-size": "list ``file`` with a wrong size in model info / tree",
}


@dataclass
class Fault:
    """A planned fault: the next ``times`` requests matching ``method`` and ``path`` get ``kind``.

    Attributes:
        kind: One of :data:`FAULT_KINDS`.
        method: HTTP method to match (``None``: any).
        path: Regular expression searched in the URL path (``""``: any path).
        times: How many matching requests it still hits (then it is spent).
        status: HTTP status of a ``"status"`` fault.
        seconds: How long a ``"hang"`` lasts (the server never hangs longer than this).
        file: Repo file whose listing entry a ``"wrong-listing-*"`` fault changes (``None``: every file).
        hits: How many requests it hit so far.
    """

    kind: str
    method: str | None = None
    path: str = ""
    times: int = 1
    status: int = 500
    seconds: float = 5.0
    file: str | None = None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and self.method in (None, method) and re.search(self.path, path) is not None


class StorageError(Exception):
    """A request the storage refuses; ``code`` is the Hub's ``X-Error-Code`` (if any)."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


def git_blob_sha1(data: bytes) -> str:
    """Git's object id of a blob with content ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's id


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit, as the Hub describes it.

    Attributes:
        path: Path in the repo (normally validated; injected entries may be anything).
        size: Size of the content in bytes.
        blob_id: Git blob id (of the content, or of the LFS pointer for LFS files).
        lfs_sha256: sha256 of the content for LFS files, else ``None``.
    """

    path: str
    size: int
    blob_id: str
    lfs_sha256: str | None = None

    @property
    def blob_key(self) -> str:
        """Key of the content in :attr:`HubStorage.blobs`."""
        return f"sha256:{self.lfs_sha256}" if self.lfs_sha256 else f"sha1:{self.blob_id}"

    @property
    def etag(self) -> str:
        """What the Hub sends as (linked) ETag: the sha256 for LFS files, else the blob id."""
        return self.lfs_sha256 or self.blob_id

    def pointer_size(self) -> int:
        return len(LFS_POINTER.format(oid=self.lfs_sha256, size=self.size).encode())


@dataclass
class Commit:
    """A commit: its id, parent, message, and the complete file table after it."""

    sha: str
    parent: str | None
    message: str
    files: dict[str, FileEntry]
    date: float = field(default_factory=time.time)


@dataclass
class Repo:
    """A model repo: commits by id, branches and tags (name -> commit id)."""

    repo_id: str
    private: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


class HubStorage:
    """Everything the test server stores; thread-safe through one lock.

    Args:
        upload_mode: ``"lfs"`` (LFS for weights and big files, as the Hub does) or
            ``"inline"`` (every file goes base64 inside the commit payload).
        multipart_chunk: LFS files larger than this are uploaded in parts of this size.
    """

    def __init__(self, upload_mode: str = "lfs", multipart_chunk: int = 8 * 1024 * 1024):
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.parts: dict[tuple[str, int], bytes] = {}
        self.upload_mode = upload_mode
        self.multipart_chunk = multipart_chunk
        self.requests: deque[tuple[str, str]] = deque(maxlen=20_000)
        self.faults: list[Fault] = []
        self.fault_log: list[tuple[str, str, str]] = []  # (kind, method, path) of every injected fault
        self.wake = threading.Event()  # set to end every hang at once (reset, server stop)
        self._counter = 0

    # -- repos and refs --------------------------------------------------------------------

    def reset(self, upload_mode: str = "lfs") -> None:
        """Forget every repo and blob (between tests) and set the upload mode."""
        with self.lock:
            self.repos.clear()
            self.blobs.clear()
            self.parts.clear()
            self.requests.clear()
            self.clear_faults()
            self.upload_mode = upload_mode

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        """A new repo whose ``main`` holds one initial commit with ``.gitattributes``."""
        with self.lock:
            if repo_id in self.repos:
                raise StorageError(409, "You already created this model repo")
            repo = Repo(repo_id, private=private)
            self.repos[repo_id] = repo
            attributes = "".join(f"*{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
            entry = self._store_regular(".gitattributes", attributes)
            sha = self._new_commit(repo, None, "initial commit", {entry.path: entry})
            repo.branches["main"] = sha
            return repo

    def delete_repo(self, repo_id: str) -> None:
        with self.lock:
            self.repo(repo_id)
            del self.repos[repo_id]

    def repo(self, repo_id: str) -> Repo:
        """The repo, or a ``RepoNotFound`` error."""
        repo = self.repos.get(repo_id)
        if repo is None:
            raise StorageError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def resolve(self, repo_id: str, revision: str) -> Commit:
        """The commit a branch, tag or full commit id names (``RevisionNotFound`` otherwise)."""
        with self.lock:
            repo = self.repo(repo_id)
            sha = repo.branches.get(revision) or repo.tags.get(revision)
            if sha is None and revision in repo.commits:
                sha = revision
            if sha is None:
                raise StorageError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return repo.commits[sha]

    def create_branch(self, repo_id: str, branch: str, starting_point: str | None = None) -> None:
        with self.lock:
            repo = self.repo(repo_id)
            if branch in repo.branches:
                raise StorageError(409, f"Reference refs/heads/{branch} already exists")
            repo.branches[branch] = self.resolve(repo_id, starting_point or "main").sha

    def delete_branch(self, repo_id: str, branch: str) -> None:
        with self.lock:
            repo = self.repo(repo_id)
            if repo.branches.pop(branch, None) is None:
                raise StorageError(404, f"Invalid rev id: {branch}", "RevisionNotFound")

    def create_tag(self, repo_id: str, revision: str, tag: str) -> None:
        with self.lock:
            repo = self.repo(repo_id)
            if tag in repo.tags:
                raise StorageError(409, f"Tag {tag} already exists")
            repo.tags[tag] = self.resolve(repo_id, revision).sha

    # -- uploads and commits ---------------------------------------------------------------

    def upload_mode_for(self, path: str, size: int) -> str:
        """``"lfs"`` or ``"regular"``, as the Hub's preupload answers for this file."""
        if self.upload_mode == "inline" or size == 0:
            return "regular"
        return "lfs" if path.endswith(LFS_PATTERNS) or size >= LFS_SIZE_THRESHOLD else "regular"

    def has_lfs(self, oid: str) -> bool:
        return f"sha256:{oid}" in self.blobs

    def put_lfs(self, oid: str, data: bytes) -> None:
        """Store an uploaded LFS object after checking its content matches its oid."""
        if hashlib.sha256(data).hexdigest() != oid:
            raise StorageError(400, f"Uploaded content does not match oid {oid}")
        with self.lock:
            self._check_capacity(len(data))
            self.blobs[f"sha256:{oid}"] = data

    def commit(self, repo_id: str, revision: str, message: str, operations: list[dict],
               parent: str | None = None) -> Commit:
        """Apply ``file`` / ``lfsFile`` / ``deletedFile`` operations on a branch as one commit."""
        with self.lock:
            repo = self.repo(repo_id)
            if revision not in repo.branches:
                raise StorageError(404, f"Invalid rev id: {revision} (commits go to branches)", "RevisionNotFound")
            head = repo.commits[repo.branches[revision]]
            if parent is not None and parent != head.sha:
                raise StorageError(412, f"Parent commit {parent} is not the head of {revision}")
            files = dict(head.files)
            for op in operations:
                key, value = op["key"], op["value"]
                path = validate_path(value["path"])
                if key == "file":
                    files[path] = self._store_regular(path, base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    oid = value["oid"]
                    if not self.has_lfs(oid):
                        raise StorageError(422, f"LFS object {oid} of {path} was never uploaded")
                    size = len(self.blobs[f"sha256:{oid}"])
                    pointer = LFS_POINTER.format(oid=oid, size=size).encode()
                    files[path] = FileEntry(path, size, git_blob_sha1(pointer), oid)
                elif key in ("deletedFile", "deletedFolder"):
                    prefix = path.rstrip("/") + "/"
                    for name in [n for n in files if n == path or (key == "deletedFolder" and n.startswith(prefix))]:
                        del files[name]
                else:
                    raise StorageError(400, f"Unknown commit operation {key!r}")
            sha = self._new_commit(repo, head.sha, message, files)
            repo.branches[revision] = sha
            return repo.commits[sha]

    # -- test helpers: break things on purpose ---------------------------------------------

    def tamper(self, repo_id: str, path: str, data: bytes, revision: str = "main") -> None:
        """Serve ``data`` for ``path`` while still advertising the file's original hashes."""
        with self.lock:
            entry = self.resolve(repo_id, revision).files[path]
            self.blobs[entry.blob_key] = data

    def inject_file(self, repo_id: str, path: str, data: bytes, revision: str = "main") -> str:
        """Commit a regular file under a raw, unvalidated ``path`` (e.g. ``../x``); return the commit id."""
        with self.lock:
            repo = self.repo(repo_id)
            head = repo.commits[repo.branches[revision]]
            entry = FileEntry(path, len(data), git_blob_sha1(data))
            self.blobs[entry.blob_key] = data
            sha = self._new_commit(repo, head.sha, f"inject {path}", {**head.files, path: entry})
            repo.branches[revision] = sha
            return sha

    def add_fault(self, kind: str, *, method: str | None = None, path: str = "", times: int = 1,
                  **options: object) -> Fault:
        """Plan a fault for the next ``times`` requests matching ``method`` and ``path`` (a regex).

        Faults are tried in the order they were added; each request takes at most one.
        ``options`` are :class:`Fault` fields (``status``, ``seconds``, ``file``).
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"Unknown fault kind {kind!r}; choose one of {', '.join(sorted(FAULT_KINDS))}.")
        fault = Fault(kind, method, path, times, **options)  # type: ignore[arg-type]
        with self.lock:
            self.faults.append(fault)
        return fault

    def take_fault(self, method: str, path: str) -> Fault | None:
        """The first planned fault matching this request (one of its ``times`` used up), or ``None``."""
        with self.lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.times -= 1
                    fault.hits += 1
                    self.fault_log.append((fault.kind, method, path))
                    return fault
        return None

    def clear_faults(self) -> None:
        """Drop every planned fault and end the hangs in progress."""
        with self.lock:
            self.faults.clear()
            self.fault_log.clear()
            self.wake.set()
            self.wake = threading.Event()

    # -- internals -------------------------------------------------------------------------

    def _store_regular(self, path: str, data: bytes) -> FileEntry:
        self._check_capacity(len(data))
        entry = FileEntry(path, len(data), git_blob_sha1(data))
        self.blobs[entry.blob_key] = data
        return entry

    def _check_capacity(self, extra: int) -> None:
        if sum(len(b) for b in self.blobs.values()) + extra > MAX_STORED_BYTES:
            raise StorageError(413, "The test Hub is full (it holds at most 512 MB)")

    def _new_commit(self, repo: Repo, parent: str | None, message: str, files: dict[str, FileEntry]) -> str:
        self._counter += 1
        seed = f"{repo.repo_id}\n{parent}\n{message}\n{self._counter}\n{sorted(files)}\n{time.time()}"
        sha = hashlib.sha1(seed.encode()).hexdigest()  # noqa: S324 - an id, like git's
        repo.commits[sha] = Commit(sha, parent, message, files)
        return sha


def validate_path(path: str) -> str:
    """Refuse the file names the Hub refuses (absolute, ``..``, backslashes, empty parts)."""
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or any(p in ("", ".", "..") for p in parts):
        raise StorageError(400, f"Invalid path in repo: {path!r}")
    return path
