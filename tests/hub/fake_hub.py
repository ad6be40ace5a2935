"""A small in-memory Hugging Face Hub for tests: the real ``huggingface_hub`` client talks to it over HTTP.

It implements what huggingface_hub 2.4 calls with Xet disabled (``HF_HUB_DISABLE_XET=1``):

- create: ``POST /api/repos/create``, ``POST /api/models/{repo}/branch/{branch}``
- upload: ``POST /api/validate-yaml``, ``POST /api/models/{repo}/preupload/{rev}``, the LFS batch API
  (``POST /{repo}.git/info/lfs/objects/batch``, then ``PUT`` to the returned href and a verify ``POST``),
  ``POST /api/models/{repo}/commit/{rev}`` (ndjson: a header line, then ``file`` / ``lfsFile`` lines)
- download: ``GET /api/models/{repo}[/revision/{rev}]`` (model info with ``sha`` and ``siblings``),
  ``GET /api/models/{repo}/tree/{rev}`` (the listing ``snapshot_download`` filters), and
  ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``, ``Content-Length`` and, for
  LFS files, ``X-Linked-Etag``/``X-Linked-Size``; ``Range: bytes=A-[B]`` requests (resumed downloads,
  streamed reads) answer 206 with ``Content-Range``; ``FakeHub.range_log`` keeps (repo, file, Range).

Errors carry the headers the client maps to its exception types (``X-Error-Code: RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``, ``GatedRepo``). Failure injection (``FakeHub.faults``):
``upload_500`` (the next N LFS PUTs answer 500), ``drop`` ({path: N}: the next N GETs of that file send the
headers and ``drop_after`` body bytes, then close the connection), ``reject_token`` (every request: 401).
``ranges`` records the ``Range`` header of every file GET (to check that a retry resumes).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

USER = "alice"  # the account the fake token belongs to
TEST_TOKEN = "hf_FakeTokenForTestsOnly0123456789"  # must never show in output, cards or files
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
RELATIONS = {"adapter", "merge", "quantized", "finetune"}
REPO_ID = re.compile(r"^[\w](?:[\w.-]{0,94}[\w])?/[\w](?:[\w.-]{0,94}[\w])?$")


# Memoised: every GET of a file answers with its ETag, and hashing a 200 MB shard per range request
# made the fake server, not the client, the cost of a streamed benchmark. (A bytes key hashes once per
# object; the lookup then hits by identity.)
@functools.cache
def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@functools.cache
def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Commit:
    sha: str
    message: str
    files: dict[str, bytes]
    lfs: set[str]  # paths stored through LFS


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, Commit] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)  # commit shas, oldest first

    def commit(self, branch: str, message: str, files: dict[str, bytes], lfs: set[str]) -> Commit:
        n = len(self.history)
        sha = hashlib.sha1(f"{self.repo_id}:{n}:{message}".encode()).hexdigest()
        c = Commit(sha, message, files, lfs)
        self.commits[sha] = c
        self.branches[branch] = sha
        self.history.append(sha)
        return c

    def at(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)


class FakeHub:
    """The server's state; ``start()`` serves it on 127.0.0.1 on a free port in a daemon thread."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # LFS objects by sha256
        self.faults: dict = {"upload_500": 0, "drop": {}, "drop_after": 0, "reject_token": False}
        self.log: list[tuple[str, str]] = []  # (method, path) of every request
        self.ranges: list[tuple[str, str | None]] = []  # (file path, Range header) of every file GET
        self.range_log: list[tuple[str, str, str | None]] = []  # (repo, file, Range) of file GETs
        self.seen_headers: list[str] = []  # every request header line, to check what the client sends
        self.yaml_checked: list[str] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            state = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    # -- seeding and inspection (test side, no HTTP) -----------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes] | Path,
        *,
        branch: str = "main",
        private: bool = False,
        gated: bool = False,
        message: str = "seed",
    ) -> str:
        """Create (or add a commit to) a repo holding ``files`` (a dict, or every file under a folder)."""
        if isinstance(files, Path):
            files = {p.relative_to(files).as_posix(): p.read_bytes() for p in files.rglob("*") if p.is_file()}
        with self.lock:
            repo = self.repos.get(repo_id) or Repo(repo_id, private=private, gated=gated)
            self.repos[repo_id] = repo
            lfs = {p for p in files if p.endswith(LFS_SUFFIXES)}
            for p in lfs:
                self.blobs[sha256_hex(files[p])] = files[p]
            return repo.commit(branch, message, dict(files), lfs).sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].at(revision)
        assert commit is not None, (repo_id, revision)
        return dict(commit.files)

    def requests(self, method: str | None = None) -> list[str]:
        return [p for m, p in self.log if method is None or m == method]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: FakeHub

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    # -- plumbing ----------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, payload: object, headers: dict | None = None, head: bool = False) -> None:
        self._send(
            status,
            json.dumps(payload).encode(),
            {"Content-Type": "application/json", **(headers or {})},
            head,
        )

    def _error(
        self, status: int, message: str, code: str | None = None, head: bool = False, **extra: str
    ) -> None:
        headers = {"X-Error-Message": message, **extra}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers, head)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.state.token}"

    def _readable(self, repo_id: str, head: bool = False) -> Repo | None:
        """The repo if this request may read it; otherwise answer as the Hub does and return None."""
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound", head)
            return None
        if repo.private and not (self._authorized() and repo_id.split("/")[0] == USER):
            self._error(401, "Repository not found", None, head)  # the Hub hides private repos
            return None
        if repo.gated and not repo_id.startswith(USER + "/"):
            self._error(403, "Access to this model is restricted", "GatedRepo", head)
            return None
        return repo

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        query = parse_qs(url.query)
        with self.state.lock:
            self.state.log.append((method, unquote(url.path)))
            self.state.seen_headers.extend(f"{k}: {v}" for k, v in self.headers.items())
        if self.state.faults["reject_token"]:
            return self._error(401, "Invalid credentials in Authorization header", head=method == "HEAD")
        try:
            route = _route(method, parts)
            if route is None:
                return self._error(404, f"no route for {method} {url.path}", head=method == "HEAD")
            name, args = route
            getattr(self, name)(*args, query=query)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- create ------------------------------------------------------------------------------------
    def create_repo(self, query: dict) -> None:
        payload = json.loads(self._body())
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        if repo_id.split("/")[0] != USER:
            return self._error(403, "You don't have the rights to create a model under this namespace")
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._json(
                    409, {"error": "You already created this model repo", "url": self._url(repo_id)}
                )
            repo = Repo(repo_id, private=payload.get("visibility") == "private")
            attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            repo.commit("main", "initial commit", {".gitattributes": attributes}, set())
            self.state.repos[repo_id] = repo
        self._json(200, {"url": self._url(repo_id), "name": repo_id, "id": repo_id})

    def create_branch(self, repo_id: str, branch: str, query: dict) -> None:
        self._body()
        repo = self._writable(repo_id)
        if repo is None:
            return
        if branch in repo.branches:
            return self._error(409, f"Reference already exists: refs/heads/{branch}")
        repo.branches[branch] = repo.branches["main"]
        self._json(200, {})

    def _writable(self, repo_id: str) -> Repo | None:
        if not self._authorized():
            self._error(401, "Invalid credentials in Authorization header")
            return None
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        if repo_id.split("/")[0] != USER:
            self._error(403, "You don't have write access to this repo")
            return None
        return repo

    def _url(self, repo_id: str) -> str:
        return f"http://{self.headers.get('Host')}/{repo_id}"

    # -- upload ------------------------------------------------------------------------------------
    def validate_yaml(self, query: dict) -> None:
        content = json.loads(self._body())["content"]
        self.state.yaml_checked.append(content)
        errors = []
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        data = {}
        if match:
            try:
                data = yaml.safe_load(match.group(1)) or {}
            except yaml.YAMLError as exc:
                errors.append(f"invalid YAML: {exc}")
        bases = data.get("base_model") or []
        for base in [bases] if isinstance(bases, str) else bases:
            if not isinstance(base, str) or not REPO_ID.match(base):
                errors.append(f'"base_model" must be a Hub model id, not {base!r}')
        relation = data.get("base_model_relation")
        if relation is not None and relation not in RELATIONS:
            errors.append(f'"base_model_relation" must be one of {sorted(RELATIONS)}')
        if errors:
            return self._json(400, {"errors": [{"message": e} for e in errors], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def preupload(self, repo_id: str, revision: str, query: dict) -> None:
        payload = json.loads(self._body())
        if self._writable(repo_id) is None:
            return
        files = [
            {
                "path": f["path"],
                "uploadMode": "lfs"
                if f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10_000_000
                else "regular",
                "shouldIgnore": False,
                "oid": None,
            }
            for f in payload["files"]
        ]
        self._json(200, {"files": files})

    def lfs_batch(self, repo_id: str, query: dict) -> None:
        payload = json.loads(self._body())
        if self._writable(repo_id) is None:
            return
        base = f"http://{self.headers.get('Host')}"
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.blobs:
                entry["actions"] = {
                    "upload": {"href": f"{base}/lfs-store/{obj['oid']}"},
                    "verify": {"href": f"{base}/lfs-verify/{repo_id}"},
                }
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def lfs_put(self, oid: str, query: dict) -> None:
        data = self._body()
        with self.state.lock:
            if self.state.faults["upload_500"] > 0:
                self.state.faults["upload_500"] -= 1
                return self._error(500, "Internal Error (injected)")
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "content does not match its oid")
        with self.state.lock:
            self.state.blobs[oid] = data
        self._send(200, headers={"ETag": '"stored"'})

    def lfs_verify(self, repo_id: str, query: dict) -> None:
        payload = json.loads(self._body())
        if (
            self.state.blobs.get(payload["oid"]) is None
            or len(self.state.blobs[payload["oid"]]) != payload["size"]
        ):
            return self._error(404, "object not found")
        self._json(200, {"success": True})

    def commit(self, repo_id: str, revision: str, query: dict) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        repo = self._writable(repo_id)
        if repo is None:
            return
        with self.state.lock:
            parent = repo.at(revision)
            if revision not in repo.branches or parent is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            files, lfs = dict(parent.files), set(parent.lfs)
            header = lines[0]
            assert header["key"] == "header", header
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                    lfs.discard(value["path"])
                elif line["key"] == "lfsFile":
                    blob = self.state.blobs.get(value["oid"])
                    if blob is None:
                        return self._error(422, f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = blob
                    lfs.add(value["path"])
                else:
                    return self._error(400, f"unsupported operation {line['key']}")
            c = repo.commit(revision, header["value"]["summary"], files, lfs)
        self._json(
            200, {"success": True, "commitOid": c.sha, "commitUrl": f"{self._url(repo_id)}/commit/{c.sha}"}
        )

    # -- download ----------------------------------------------------------------------------------
    def model_info(self, repo_id: str, revision: str | None, query: dict) -> None:
        repo = self._readable(repo_id)
        if repo is None:
            return
        c = repo.at(revision or "main")
        if c is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        siblings = [{"rfilename": p} for p in sorted(c.files)]
        self._json(200, {"id": repo_id, "sha": c.sha, "private": repo.private, "gated": repo.gated,
                         "siblings": siblings, "tags": []})  # fmt: skip

    def tree(self, repo_id: str, revision: str, query: dict) -> None:
        repo = self._readable(repo_id)
        if repo is None:
            return
        c = repo.at(revision)
        if c is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        entries = []
        for path in sorted(c.files):
            data = c.files[path]
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_oid(data)}
            if path in c.lfs:
                entry["lfs"] = {
                    "oid": sha256_hex(data),
                    "size": len(data),
                    "pointerSize": 134,
                }
            entries.append(entry)
        self._json(200, entries)

    def resolve_head(self, repo_id: str, revision: str, path: str, query: dict) -> None:
        self.resolve(repo_id, revision, path, query=query, head=True)

    def resolve(self, repo_id: str, revision: str, path: str, query: dict, head: bool = False) -> None:
        repo = self._readable(repo_id, head)
        if repo is None:
            return
        c = repo.at(revision)
        if c is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head)
        if path not in c.files:
            return self._error(404, "Entry not found", "EntryNotFound", head, **{"X-Repo-Commit": c.sha})
        data = c.files[path]
        headers = {"X-Repo-Commit": c.sha, "ETag": f'"{git_oid(data)}"', "Accept-Ranges": "bytes"}
        if path in c.lfs:
            headers["X-Linked-Etag"] = f'"{sha256_hex(data)}"'
            headers["X-Linked-Size"] = str(len(data))
        if head:
            return self._send(200, data, {**headers, "Content-Length": str(len(data))}, head=True)
        start, end = 0, len(data)
        status = 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        with self.state.lock:
            self.state.ranges.append((path, self.headers.get("Range")))
            self.state.range_log.append((repo_id, path, self.headers.get("Range")))
        if m:
            start, status = int(m.group(1)), 206
            end = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
            if start >= len(data):
                return self._error(
                    416, "Range Not Satisfiable", None, **{"Content-Range": f"bytes */{len(data)}"}
                )
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        body = data[start:end]
        with self.state.lock:
            drops = self.state.faults["drop"]
            drop = drops.get(path, 0) > 0
            if drop:
                drops[path] -= 1
        if not drop:
            return self._send(status, body, headers)
        # A dropped connection: promise the whole body, send part of it, hang up.
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body[: self.state.faults["drop_after"]])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


def _route(method: str, p: list[str]) -> tuple[str, tuple] | None:
    """(handler name, its positional arguments) for a request path split into unquoted segments."""
    n = len(p)
    if method == "POST" and p == ["api", "repos", "create"]:
        return "create_repo", ()
    if method == "POST" and p == ["api", "validate-yaml"]:
        return "validate_yaml", ()
    if p[:2] == ["api", "models"] and n >= 4:
        repo_id = f"{p[2]}/{p[3]}"
        rest = p[4:]
        if method == "GET" and not rest:
            return "model_info", (repo_id, None)
        if method == "GET" and len(rest) == 2 and rest[0] == "revision":
            return "model_info", (repo_id, rest[1])
        if method == "GET" and len(rest) == 2 and rest[0] == "tree":
            return "tree", (repo_id, rest[1])
        if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
            return "preupload", (repo_id, rest[1])
        if method == "POST" and len(rest) == 2 and rest[0] == "commit":
            return "commit", (repo_id, rest[1])
        if method == "POST" and len(rest) == 2 and rest[0] == "branch":
            return "create_branch", (repo_id, rest[1])
        return None
    if method == "POST" and n == 6 and p[1].endswith(".git") and p[2:] == ["info", "lfs", "objects", "batch"]:
        return "lfs_batch", (f"{p[0]}/{p[1][: -len('.git')]}",)
    if method == "PUT" and n == 2 and p[0] == "lfs-store":
        return "lfs_put", (p[1],)
    if method == "POST" and n == 3 and p[0] == "lfs-verify":
        return "lfs_verify", (f"{p[1]}/{p[2]}",)
    if method in ("GET", "HEAD") and n >= 5 and p[2] == "resolve":
        return ("resolve_head" if method == "HEAD" else "resolve"), (f"{p[0]}/{p[1]}", p[3], "/".join(p[4:]))
    return None
