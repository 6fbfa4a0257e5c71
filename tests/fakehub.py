"""A local fake of the Hugging Face Hub, enough for huggingface_hub's download paths (read from its 2.x source).

Endpoints (what `HfApi.model_info`, `list_repo_tree`, `get_hf_file_metadata`, `http_get` call):
  GET  /api/models/{repo}[/revision/{rev}]      ?blobs=True adds size, blobId, lfs{sha256,size,pointerSize}
  GET  /api/models/{repo}/tree/{rev}[/{path}]   ?recursive=True&expand=True
  HEAD /{repo}/resolve/{rev}/{file}              X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size, Content-Length
  GET  /{repo}/resolve/{rev}/{file}              honours `Range: bytes=N-` with 206 + Content-Range
Errors carry `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) as the real Hub does, so
huggingface_hub raises its typed errors.

Switches, settable while serving: `fail_once[path] = n` (send n body bytes, then drop the connection, once),
`corrupt.add(path)` (serve altered bytes of the right length), `missing.add(path)` (404 on download),
`require_token = "hf_x"` (gated: downloads need `Authorization: Bearer hf_x`), `private = True` (the API needs
the token too), `redirect_lfs = True` (LFS downloads 302 to a CDN path, like the real Hub). `requests` logs every
request (method, path, Range, Authorization).

A mirror or proxy that is not the Hub: `no_hashes = True` (the listing gives sizes only), `listing[path] = {...}`
(keys merged into that file's listing entry, e.g. a forged `lfs.sha256`), `hold[path] = n` (send n body bytes,
then pause `hold_s` seconds, once), and `add_file(repo_id, name, data)`, which lists any name, `../x` included,
and serves it at the URL a client actually requests for it (dot segments resolved), as a catch-all mirror would.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class RepoFile:
    path: str
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def git_oid(self) -> str:
        """The git blob id: of the LFS pointer for LFS files, of the content otherwise (as on the Hub)."""
        return git_blob_oid(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, RepoFile]
    commit: str
    revisions: set[str] = field(default_factory=set)

    @classmethod
    def from_dir(cls, repo_id: str, root: Path, commit: str | None = None) -> FakeRepo:
        files = {}
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                rel = p.relative_to(root).as_posix()
                files[rel] = RepoFile(rel, p.read_bytes(), rel.endswith(LFS_SUFFIXES))
        if commit is None:
            h = hashlib.sha1()
            for f in files.values():
                h.update(f.path.encode() + b"\0" + f.git_oid.encode())
            commit = h.hexdigest()
        return cls(repo_id, files, commit, {"main", commit})


@dataclass(frozen=True)
class Logged:
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass(frozen=True)
class Served:
    file: str  # path inside the repo
    url: str  # the URL path it was served from (/{repo}/resolve/... or /__cdn/...)
    range: str | None
    authorization: str | None


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # Clients that drop connections (an interrupted download) are part of the tests, not server errors.
        pass


class FakeHub:
    """Serves repos over HTTP on 127.0.0.1 (random port). Use as a context manager; `endpoint` is the base URL."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.fail_once: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.missing: set[str] = set()
        self.require_token: str | None = None
        self.private = False
        self.redirect_lfs = False
        self.no_hashes = False
        self.listing: dict[str, dict] = {}
        self.hold: dict[str, int] = {}
        self.hold_s = 1.0
        self.requests: list[Logged] = []
        self.served: list[Served] = []
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(
        self, repo_id: str, root: Path, commit: str | None = None, revisions: tuple[str, ...] = ()
    ) -> FakeRepo:
        """Serve the files under `root` as `repo_id` (a snapshot taken now)."""
        repo = FakeRepo.from_dir(repo_id, root, commit)
        repo.revisions.update(revisions)
        self.repos[repo_id] = repo
        return repo

    def add_file(self, repo_id: str, name: str, data: bytes) -> RepoFile:
        """List `name` (any string, unchecked) in `repo_id` and serve `data` for it."""
        f = RepoFile(name, data, name.endswith(LFS_SUFFIXES))
        self.repos[repo_id].files[name] = f
        return f

    def downloads(self, path: str | None = None) -> list[Served]:
        """File bodies sent (optionally of one repo file), in order; redirects are not counted."""
        return [d for d in self.served if path is None or d.file == path]

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # keep test output clean
            pass

        # -- plumbing --

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, obj, headers: dict | None = None) -> None:
            self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, code: str | None, message: str) -> None:
            headers = {"X-Error-Message": message, "Content-Type": "application/json"}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), headers)

        def _authorized(self) -> bool:
            return hub.require_token is None or self.headers.get("Authorization") == f"Bearer {hub.require_token}"

        def _deny(self, repo: FakeRepo) -> None:
            status = 403 if self.headers.get("Authorization") else 401
            msg = f"Access to model {repo.repo_id} is restricted. You must accept the license."
            self._error(status, "GatedRepo", msg)

        def _repo(self, owner: str, name: str) -> FakeRepo | None:
            repo = hub.repos.get(f"{owner}/{name}")
            if repo is None or (hub.private and not self._authorized()):
                self._error(404 if repo is None else 401, "RepoNotFound", "Repository not found")
                return None
            return repo

        def _revision(self, repo: FakeRepo, rev: str) -> bool:
            if rev in repo.revisions:
                return True
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return False

        # -- routes --

        def do_GET(self) -> None:
            self._route()

        def do_HEAD(self) -> None:
            self._route()

        def _route(self) -> None:
            url = urlsplit(self.path)
            with hub._lock:
                auth = self.headers.get("Authorization")
                hub.requests.append(Logged(self.command, unquote(url.path), self.headers.get("Range"), auth))
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            query = parse_qs(url.query)
            if len(parts) >= 3 and parts[:2] == ["api", "models"]:
                return self._api(parts[2:], query)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(parts[0], parts[1], parts[3], "/".join(parts[4:]))
            for repo in hub.repos.values():
                for f in repo.files.values():
                    # what a client's URL normalization makes of a hostile name (add_file)
                    if any(url.path == posixpath.normpath(f"/{repo.repo_id}/resolve/{rev}/{f.path}")
                           for rev in repo.revisions):
                        return self._serve(repo, f, {"X-Repo-Commit": repo.commit})
            if len(parts) >= 4 and parts[0] == "__cdn":
                repo = hub.repos.get(f"{parts[1]}/{parts[2]}")
                path = "/".join(parts[3:])
                if repo is None or path not in repo.files:
                    return self._error(404, None, "no such object")
                return self._serve(repo, repo.files[path])
            self._error(404, None, "not found")

        def _api(self, rest: list[str], query: dict) -> None:
            if len(rest) < 2:
                return self._error(404, None, "not found")
            repo = self._repo(rest[0], rest[1])
            if repo is None:
                return
            tail = rest[2:]
            if not tail or tail[0] == "revision":
                rev = tail[1] if len(tail) > 1 else "main"
                if self._revision(repo, rev):
                    self._json(self._info(repo, blobs=query.get("blobs", ["false"])[0].lower() == "true"))
                return
            if tail[0] == "tree" and len(tail) >= 2:
                if self._revision(repo, tail[1]):
                    recursive = query.get("recursive", ["false"])[0].lower() == "true"
                    self._json(self._tree(repo, "/".join(tail[2:]).strip("/"), recursive))
                return
            self._error(404, None, "not found")

        def _info(self, repo: FakeRepo, blobs: bool) -> dict:
            siblings = []
            for f in repo.files.values():
                s = {"rfilename": f.path}
                if blobs:
                    s["size"] = len(f.data)
                    if not hub.no_hashes:
                        s["blobId"] = f.git_oid
                        if f.lfs:
                            s["lfs"] = {"sha256": f.sha256, "size": len(f.data), "pointerSize": len(f.pointer)}
                    s.update(hub.listing.get(f.path, {}))
                siblings.append(s)
            return {
                "id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit, "private": hub.private,
                "gated": "manual" if hub.require_token else False, "disabled": False, "siblings": siblings,
            }

        def _tree(self, repo: FakeRepo, prefix: str, recursive: bool) -> list[dict]:
            entries, dirs = [], set()
            base = f"{prefix}/" if prefix else ""
            for f in repo.files.values():
                if not f.path.startswith(base):
                    continue
                rel = f.path[len(base):]
                if "/" in rel and not recursive:
                    dirs.add(base + rel.split("/")[0])
                    continue
                if recursive:
                    parts = rel.split("/")[:-1]
                    dirs.update(base + "/".join(parts[: i + 1]) for i in range(len(parts)))
                e = {"type": "file", "oid": f.git_oid, "size": len(f.data), "path": f.path}
                if f.lfs:
                    e["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": len(f.pointer)}
                entries.append(e)
            entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)]
            return entries

        def _resolve(self, owner: str, name: str, rev: str, path: str) -> None:
            repo = self._repo(owner, name)
            if repo is None or not self._revision(repo, rev):
                return
            if not self._authorized():
                return self._deny(repo)
            f = repo.files.get(path)
            if f is None or path in hub.missing:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
            common = {"X-Repo-Commit": repo.commit}
            if f.lfs:
                common.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": len(f.data)})
                if hub.redirect_lfs:
                    loc = f"/__cdn/{quote(repo.repo_id)}/{quote(f.path)}"
                    self.send_response(302)
                    for k, v in {**common, "Location": loc, "ETag": f'"{f.git_oid}"'}.items():
                        self.send_header(k, str(v))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            self._serve(repo, f, common)

        def _serve(self, repo: FakeRepo, f: RepoFile, extra: dict | None = None) -> None:
            data = f.data
            if f.path in hub.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            size = len(data)
            start, status = 0, 200
            rng = self.headers.get("Range")
            if rng:
                # only the form huggingface_hub sends: bytes=N-
                start = int(rng.split("=", 1)[1].split("-", 1)[0])
                status = 206
            if start > size:
                return self._send(416, b"", {"Content-Range": f"bytes */{size}"})
            body = data[start:]
            self.send_response(status)
            headers = {"ETag": f'"{f.etag}"', "Accept-Ranges": "bytes", "Content-Length": len(body), **(extra or {})}
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
            for k, v in headers.items():
                self.send_header(k, str(v))
            self.end_headers()
            if self.command == "HEAD":
                return
            with hub._lock:
                cut = hub.fail_once.pop(f.path, None)
                held = hub.hold.pop(f.path, None)
                hub.served.append(
                    Served(f.path, unquote(urlsplit(self.path).path), rng, self.headers.get("Authorization"))
                )
            if cut is not None and cut < len(body):
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True  # the client sees the body end early
                return
            if held is not None:
                self.wfile.write(body[:held])
                self.wfile.flush()
                time.sleep(hub.hold_s)  # a slow link: the client has written `held` bytes and waits for more
                body = body[held:]
            self.wfile.write(body)

    return Handler


def write_small_repo(root: Path, n_shards: int = 3, seed: int = 0) -> Path:
    """A small repo in the official layout (sharded safetensors + index, config, tokenizer, encoding/), plus
    files a pull must skip (README.md, inference/)."""
    import numpy as np
    from safetensors.numpy import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors = {
            f"layers.{i}.attn.wkv.weight": rng.standard_normal((128, 64)).astype(np.float32),
            f"layers.{i}.attn_norm.weight": rng.standard_normal((64,)).astype(np.float16),
        }
        save_file(tensors, str(root / shard))
        weight_map.update({k: shard for k in tensors})
    index = {"metadata": {"total_size": sum((root / s).stat().st_size for s in set(weight_map.values()))},
             "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (root / "config.json").write_text(json.dumps({"model_type": "deepseek_v4", "num_hidden_layers": n_shards}))
    (root / "generation_config.json").write_text(json.dumps({"temperature": 1.0, "top_p": 1.0}))
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}))
    (root / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>"}))
    (root / "encoding").mkdir(exist_ok=True)
    (root / "encoding" / "encoding_dsv4.py").write_text("def encode(messages):\n    return messages\n")
    (root / "README.md").write_text("# not pulled\n")
    (root / "inference").mkdir(exist_ok=True)
    (root / "inference" / "model.py").write_text("# not pulled\n")
    return root
