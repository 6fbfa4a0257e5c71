"""`pull`: fetch a model's files from the Hugging Face Hub into the store, resumably and verified.

huggingface_hub supplies the metadata (`HfApi.model_info(files_metadata=True)`: sizes, LFS sha256, git blob
ids), URLs, auth headers and its retrying HTTP GET. We keep our own partial files because
`hf_hub_download` (2.x) writes each attempt to a process-unique temp file that it deletes on failure, so an
interrupted 160 GB pull would restart every unfinished shard from byte 0. Ours live in
`<model>/.v4-partial/<hash of name and content>.part` and are continued with a Range request by the next run.

Our own download path also bypasses huggingface_hub's name checks, so every name from the listing (and from
an earlier pull's manifest) goes through `safepath` before it becomes a path, and every hash through
`hex_digest`: a hostile mirror or proxy can make a pull fail, never write or delete outside the model folder.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from v4cli import __version__
from quant.errors import BadInput, DiskSpaceError, DownloadError, NotFoundError, V4Error
from v4cli.registry import HubSpec, LocalSpec, resolve_name
from v4cli.safepath import UnsafePath, hex_digest, inside, safe_relpath
from v4cli.store import PARTIAL, FileRecord, Manifest, Store, check_file, format_bytes, hash_file

DISK_MARGIN = 0.02  # keep 2% headroom over the bytes still to download


@dataclass(frozen=True)
class PullProgress:
    """A progress event: bytes and files done of the total, and the file most recently written."""

    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    current: str | None


@dataclass(frozen=True)
class PullResult:
    """What `pull` left in the store."""

    name: str
    repo_id: str
    revision: str
    path: Path
    files: int
    total_bytes: int
    downloaded_bytes: int
    up_to_date: bool
    offline: bool = False
    unverified: int = 0  # files the endpoint gave no hash for, accepted on size alone (--no-verify)


ProgressFn = Callable[[PullProgress], None]


def is_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read now rather than when huggingface_hub was imported."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env is not None:
        return env.strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE)


def default_endpoint() -> str:
    """HF_ENDPOINT read now (huggingface_hub reads it once at import), else the library's endpoint."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def pull(
    name: str | HubSpec,
    *,
    store: Store | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    offline: bool | None = None,
    verify: bool = False,
    no_verify: bool = False,
    max_workers: int = 4,
    on_progress: ProgressFn | None = None,
) -> PullResult:
    """Pull a model into the store; offline, only verify what is there. Idempotent and resumable.

    `verify=True` re-hashes files already present instead of trusting an earlier verification.
    `no_verify=True` accepts files the endpoint gives no hash for, on size alone; the manifest lists them as
    unverified. Without it such an endpoint is refused before anything is downloaded.
    """
    spec = resolve_name(name) if isinstance(name, str) else name
    if isinstance(spec, LocalSpec):
        raise BadInput(f"{spec.path} is a local path; there is nothing to pull",
                       hint="pass it to quantize/chat directly")
    store = store or Store()
    offline = is_offline() if offline is None else offline
    if offline:
        return _verify_offline(spec, store, on_progress)
    endpoint = (endpoint or default_endpoint()).rstrip("/")
    with store.lock(spec.name):
        return _Pull(spec, store, token, endpoint, verify, no_verify, max_workers, on_progress).run()


# ---- online --------------------------------------------------------------------------------------------------


class _Cancelled(Exception):
    pass


class _Tracker:
    """Aggregates byte counts from worker threads; calls the user callback under one lock, never concurrently."""

    def __init__(self, total: int, files_total: int, on_progress: ProgressFn | None):
        self.bytes_done = 0
        self.bytes_total = total
        self.files_done = 0
        self.files_total = files_total
        self.downloaded = 0
        self.on_progress = on_progress
        self.cancel = threading.Event()
        self._lock = threading.Lock()

    def add(self, n: int, current: str | None, downloaded: bool = True, file_done: bool = False) -> None:
        with self._lock:
            self.bytes_done += n
            if downloaded:
                self.downloaded += n
            if file_done:
                self.files_done += 1
            if self.on_progress is not None:
                self.on_progress(
                    PullProgress(self.bytes_done, self.bytes_total, self.files_done, self.files_total, current)
                )


class _HashingWriter:
    """The file object handed to huggingface_hub's `http_get`: hashes and counts what it writes.

    `http_get` may rewind and truncate when a server ignores our Range; the hash is then rebuilt from disk.
    """

    def __init__(self, f, record: FileRecord, tracker: _Tracker):
        self.f, self.record, self.tracker = f, record, tracker
        self.hash = hash_file(Path(f.name), record, upto=f.tell())

    def write(self, data: bytes) -> int:
        if self.tracker.cancel.is_set():
            raise _Cancelled()
        n = self.f.write(data)
        if self.hash is not None:
            self.hash.update(data)
        self.tracker.add(len(data), self.record.path)
        return n

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def truncate(self, size: int | None = None) -> int:
        before = os.fstat(self.f.fileno()).st_size
        after = self.f.truncate(size)
        self.f.flush()
        self.hash = hash_file(Path(self.f.name), self.record, upto=after)
        self.tracker.add(after - before, self.record.path)
        return after


class _SilentBar:
    """Stands in for tqdm inside `http_get`: progress is reported through our own callback instead."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def update(self, n: int = 1) -> None:
        pass


class _Pull:
    def __init__(self, spec, store, token, endpoint, verify, no_verify, max_workers, on_progress):
        self.spec: HubSpec = spec
        self.store: Store = store
        self.token = token
        self.endpoint: str = endpoint
        self.verify = verify
        self.no_verify = no_verify
        self.max_workers = max(1, max_workers)
        self.on_progress = on_progress
        self.dir = store.model_dir(spec.name)
        self.partial = store.partial_dir(spec.name)

    # -- plan --

    def remote_files(self) -> tuple[str, list[FileRecord]]:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=self.endpoint, token=self.token, library_name="v4", library_version=__version__)
        with _hub_errors(self.spec, self.endpoint):
            info = api.model_info(self.spec.repo_id, revision=self.spec.revision, files_metadata=True)
        files = []
        for s in info.siblings or []:
            if not any(fnmatch.fnmatchcase(s.rfilename, p) for p in self.spec.patterns):
                continue
            # Everything below becomes a path (the file, its partial) or names one: checked before any write.
            path = safe_relpath(s.rfilename, f"file name from {self.endpoint}")
            if not isinstance(s.size, int) or s.size < 0:
                raise DownloadError(f"the Hub sent no valid size for {path} in {self.spec.repo_id}")
            sha = hex_digest(s.lfs.sha256, 64, f"sha256 of {path}") if s.lfs is not None else None
            oid = hex_digest(s.blob_id, 40, f"git blob id of {path}") if sha is None and s.blob_id else None
            files.append(FileRecord(path, s.size, sha256=sha, git_oid=oid))
        if not files:
            raise NotFoundError(
                f"{self.spec.repo_id}@{_short(info.sha)} has no files matching {', '.join(self.spec.patterns)}",
                hint="check the pattern after hf:OWNER/REPO:",
            )
        if not info.sha:
            raise DownloadError(f"the Hub sent no commit id for {self.spec.repo_id}")
        files.sort(key=lambda r: r.path)
        unhashed = [r.path for r in files if r.expected_digest() is None]
        if unhashed and not self.no_verify:
            # Size alone cannot tell a corrupted or substituted file from the real one.
            raise DownloadError(
                f"{self.endpoint} gives no hash for {len(unhashed)} of {len(files)} files of {self.spec.repo_id} "
                f"({', '.join(unhashed[:3])}{', ...' if len(unhashed) > 3 else ''}), so they cannot be verified",
                hint=f"use an endpoint that sends hashes, or v4 pull {self.spec.name} --no-verify "
                     "to accept them checked by size only",
            )
        return info.sha, files

    def known_good(self, old: Manifest | None, prev: dict | None, revision: str) -> dict[str, FileRecord]:
        """Files verified by an earlier pull (complete manifest, or an unfinished pull of this revision)."""
        good: dict[str, FileRecord] = dict(old.files) if old is not None else {}
        if prev is not None and prev.get("revision") == revision:
            good.update(_records(prev.get("verified", {})))
        return good

    def carried_and_stale(self, old: Manifest | None, prev: dict | None, revision: str, plan: set[str]):
        """Files this pull keeps from an earlier one at the same commit (another pattern of the same repo),
        and files of other revisions to delete once it completes. Kept in the state so a resumed pull knows."""
        carried: dict[str, FileRecord] = {}
        stale: set[str] = set()
        if prev is not None:
            stale |= set(prev.get("stale", []))
            if prev.get("revision") == revision:
                carried.update(_records(prev.get("carried", {})))
            else:
                stale |= set(prev.get("files", {}))
        if old is not None:
            if old.revision == revision:
                carried.update(old.files)
            else:
                stale |= set(old.files)
        carried = {p: r for p, r in carried.items() if p not in plan and self._stored(p).is_file()}
        stale = stale - plan - set(carried)
        for p in stale:
            self._stored(p)  # refused now, before anything is written, rather than at deletion time
        return carried, stale

    def _stored(self, name: str) -> Path:
        """A file an earlier pull recorded (possibly an older v4 that took any name), checked like a Hub name."""
        try:
            safe_relpath(name, "stored file name")
        except UnsafePath as e:
            raise UnsafePath(f"{e} (recorded by an earlier pull of {self.spec.name})",
                             hint=f"v4 rm {self.spec.name}, then v4 pull {self.spec.name}") from None
        return inside(self.dir, name, "stored file name")

    def _dest(self, r: FileRecord) -> Path:
        # Again after resolving symlinks: a link already in the folder must not carry the write outside it.
        return inside(self.dir, r.path, f"file name from {self.endpoint}")

    # -- run --

    def run(self) -> PullResult:
        revision, files = self.remote_files()
        self.revision = revision
        name = self.spec.name
        inside(self.dir, PARTIAL, "partial folder")  # state.json and the partials are written there
        old = self.store.read_manifest(name)
        prev = self.store.read_state(name)
        good = self.known_good(old, prev, revision)
        done: list[FileRecord] = []
        todo: list[FileRecord] = []
        for r in files:
            g = good.get(r.path)
            # Files verified by an earlier pull are trusted by size; any other file already there is hashed.
            trusted = g is not None and g.key == r.key
            dest = self._dest(r)
            if dest.is_file() and check_file(dest, r, full=self.verify or not trusted) is None:
                done.append(r)
            else:
                todo.append(r)

        carried, stale = self.carried_and_stale(old, prev, revision, {r.path for r in files})
        merged = {**carried, **{r.path: r for r in files}}
        if not todo and not stale and old is not None and old.revision == revision and set(old.files) == set(merged):
            return self._result(old, downloaded=0, up_to_date=True)

        self.store.drop_manifest(name)  # the folder is in flux from here until the new manifest
        state = {
            "name": name,
            "repo_id": self.spec.repo_id,
            "revision": revision,
            "files": {r.path: _rec_json(r) for r in files},
            "verified": {r.path: _rec_json(r) for r in done},
            "carried": {p: _rec_json(r) for p, r in carried.items()},
            "stale": sorted(stale),
        }
        self.partial.mkdir(parents=True, exist_ok=True)
        self.store.write_state(name, state)
        self._check_disk(todo)

        total = sum(r.size for r in files)
        tracker = _Tracker(total, len(files), self.on_progress)
        tracker.files_done = len(done)
        tracker.add(sum(r.size for r in done), None, downloaded=False)
        self._download_all(todo, tracker, state)

        for p in stale:
            self._stored(p).unlink(missing_ok=True)  # files of another revision that this one does not have
        manifest = Manifest(name, self.spec.repo_id, revision, merged, requested_revision=self.spec.revision)
        self.store.write_manifest(manifest)
        shutil.rmtree(self.partial, ignore_errors=True)
        return self._result(manifest, downloaded=tracker.downloaded, up_to_date=False)

    def _result(self, manifest: Manifest, downloaded: int, up_to_date: bool) -> PullResult:
        return PullResult(
            self.spec.name, manifest.repo_id, manifest.revision, self.dir, len(manifest.files),
            manifest.total_bytes, downloaded, up_to_date, unverified=len(manifest.unverified),
        )

    def _part_path(self, r: FileRecord) -> Path:
        # One partial per file and content: two files never share one, even of equal size or content (parallel
        # workers would interleave; a resume would splice), and a partial never resumes content the listing
        # no longer names. Hashing keeps the name short and plain whatever the file's path.
        tag = hashlib.sha256(f"{r.path}\0{r.key}".encode()).hexdigest()
        return inside(self.dir, f"{PARTIAL}/{tag}.part", "partial file")

    def _check_disk(self, todo: list[FileRecord]) -> None:
        remaining = 0
        for r in todo:
            part = self._part_path(r)
            have = part.stat().st_size if part.is_file() else 0
            remaining += r.size - min(have, r.size)
        need = int(remaining * (1 + DISK_MARGIN))
        free = shutil.disk_usage(self.dir).free
        if need > free:
            raise DiskSpaceError(
                f"{self.spec.name} needs {format_bytes(need)} more ({format_bytes(remaining)} + 2% margin) "
                f"but {self.dir} has {format_bytes(free)} free",
                hint="free some space, or set V4_HOME to a folder on a bigger disk",
            )

    def _download_all(self, todo: list[FileRecord], tracker: _Tracker, state: dict) -> None:
        if not todo:
            return
        state_lock = threading.Lock()

        def one(r: FileRecord) -> None:
            if tracker.cancel.is_set():
                raise _Cancelled()
            try:
                self._download(r, tracker)
            except BaseException:
                tracker.cancel.set()  # stop the other workers now, not when the main thread gets to it
                raise
            with state_lock:
                state["verified"][r.path] = _rec_json(r)
                self.store.write_state(self.spec.name, state)
            tracker.add(0, r.path, file_done=True)

        pool = ThreadPoolExecutor(max_workers=min(self.max_workers, len(todo)), thread_name_prefix="v4-pull")
        futures = [pool.submit(one, r) for r in todo]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        finally:
            # Ctrl-C or a failed file: stop the other workers at their next write; their partials stay for resume.
            if not all(f.done() for f in futures):
                tracker.cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
        errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
        # Report the failure itself, not the workers it stopped.
        errors.sort(key=lambda e: isinstance(e, _Cancelled))
        if errors:
            raise errors[0]

    def _download(self, r: FileRecord, tracker: _Tracker) -> None:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        part = self._part_path(r)
        part.parent.mkdir(parents=True, exist_ok=True)
        if part.is_file() and part.stat().st_size > r.size:
            part.unlink()  # longer than the file can be: not a prefix of it
        # By commit, not branch: every file of one pull comes from the same snapshot.
        url = hf_hub_url(self.spec.repo_id, r.path, revision=self.revision, endpoint=self.endpoint)
        headers = build_hf_headers(token=self.token, library_name="v4", library_version=__version__)
        with open(part, "a+b") as raw:
            raw.seek(0, os.SEEK_END)
            resume = raw.tell()
            writer = _HashingWriter(raw, r, tracker)
            tracker.add(resume, r.path, downloaded=False)
            try:
                with _hub_errors(self.spec, self.endpoint, r.path):
                    http_get(url, writer, resume_size=resume, headers=headers, expected_size=r.size,
                             displayed_filename=r.path, tqdm_class=_SilentBar)
                raw.flush()
                os.fsync(raw.fileno())
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise DiskSpaceError(f"the disk filled up while writing {part}", hint="free space, then pull again")
                raise
            digest = writer.hash.hexdigest() if writer.hash is not None else None
        size = part.stat().st_size
        if size != r.size or digest != r.expected_digest():
            part.unlink(missing_ok=True)
            what = f"size {size} != {r.size}" if size != r.size else f"hash {digest} != {r.expected_digest()}"
            raise DownloadError(
                f"{r.path} from {self.spec.repo_id} failed verification ({what}); the bad copy was deleted",
                hint=f"run v4 pull {self.spec.name} again; if it repeats, the mirror or proxy is altering files",
            )
        dest = self._dest(r)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, dest)  # same filesystem: the complete file appears in one step


def _rec_json(r: FileRecord) -> dict:
    return {"size": r.size, "sha256": r.sha256, "git_oid": r.git_oid}


def _records(d: dict) -> dict[str, FileRecord]:
    return {p: FileRecord(path=p, **r) for p, r in d.items()}


def _short(rev: str | None) -> str:
    return (rev or "?")[:7]


class _hub_errors:
    """Turn huggingface_hub/httpx errors into our typed errors, each with the next thing to try."""

    def __init__(self, spec: HubSpec, endpoint: str, filename: str | None = None):
        self.spec, self.endpoint, self.filename = spec, endpoint, filename

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb) -> bool:
        if e is None or isinstance(e, (V4Error, _Cancelled)) or not isinstance(e, Exception):
            return False
        import httpx2
        from huggingface_hub import errors as hfe

        repo = self.spec.repo_id
        rev = self.spec.revision or "main"
        what = f"{repo}/{self.filename}" if self.filename else repo
        again = f"v4 pull {self.spec.name}"
        token_hint = f"accept the license at {self.endpoint}/{repo}, then {again} --token hf_... (or set HF_TOKEN)"
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, hfe.GatedRepoError):
            raise DownloadError(f"{repo} is gated: the Hub refused access ({status})", hint=token_hint) from e
        if isinstance(e, hfe.RepositoryNotFoundError) and status == 401:
            # The Hub answers 401, not 404, for missing repos too when the request carries no token.
            raise DownloadError(
                f"{repo} was not found, or it is private or gated and needs a token (401)",
                hint=f"check the name; if it is gated, {token_hint}",
            ) from e
        if isinstance(e, hfe.HfHubHTTPError) and status in (401, 403):
            raise DownloadError(f"the Hub refused access to {what} ({status})", hint=token_hint) from e
        if isinstance(e, hfe.RevisionNotFoundError):
            raise NotFoundError(f"revision {rev} not found in {repo}", hint="check the revision") from e
        if isinstance(e, hfe.RepositoryNotFoundError):
            raise NotFoundError(f"repository {repo} not found on {self.endpoint}", hint="check the name") from e
        if isinstance(e, hfe.RemoteEntryNotFoundError):
            raise DownloadError(f"{what} is listed but the Hub does not serve it (404)", hint=again) from e
        if isinstance(e, hfe.HfHubHTTPError):
            raise DownloadError(f"the Hub answered {status} for {what}", hint=f"try again later: {again}") from e
        if isinstance(e, (httpx2.TransportError, hfe.OfflineModeIsEnabled)):
            raise DownloadError(
                f"network error while fetching {what} from {self.endpoint}: {e}",
                hint=f"check the connection, then {again} resumes; HF_HUB_OFFLINE=1 verifies what is present",
            ) from e
        if isinstance(e, OSError) and e.errno is None and self.filename:
            # http_get's size consistency check: the connection ended early more times than it retries.
            raise DownloadError(f"download of {what} ended early: {e}", hint=f"{again} resumes it") from e
        return False


# ---- offline -------------------------------------------------------------------------------------------------


def _verify_offline(spec: HubSpec, store: Store, on_progress: ProgressFn | None) -> PullResult:
    """HF_HUB_OFFLINE: touch no network; re-hash what the store holds and say what is missing."""
    name = spec.name
    manifest = store.read_manifest(name)
    if manifest is None:
        state = store.read_state(name)
        if state is None:
            raise NotFoundError(f"offline: {name} has not been pulled",
                                hint=f"unset HF_HUB_OFFLINE, then v4 pull {name}")
        n = len(state.get("files", {}))
        k = len(state.get("verified", {}))
        raise DownloadError(
            f"offline: {name} is incomplete ({k} of {n} files downloaded)",
            hint=f"unset HF_HUB_OFFLINE, then v4 pull {name} resumes",
        )
    if spec.revision is not None and manifest.revision != spec.revision:
        raise DownloadError(
            f"offline: {name} is stored at revision {_short(manifest.revision)}, not {_short(spec.revision)}",
            hint=f"unset HF_HUB_OFFLINE, then v4 pull {name}",
        )
    folder = store.model_dir(name)
    tracker = _Tracker(manifest.total_bytes, len(manifest.files), on_progress)
    bad: list[str] = []
    bad_paths: set[str] = set()
    for p, r in sorted(manifest.files.items()):
        problem = check_file(inside(folder, p, "stored file name"), r)
        if problem:
            bad.append(f"{p} ({problem})")
            bad_paths.add(p)
        tracker.add(r.size, p, downloaded=False, file_done=True)
    if bad:
        # No longer complete: hand the good files to the next online pull as verified, then drop the manifest.
        with store.lock(name):
            store.partial_dir(name).mkdir(parents=True, exist_ok=True)
            store.write_state(name, {
                "name": name, "repo_id": manifest.repo_id, "revision": manifest.revision,
                "files": {p: _rec_json(r) for p, r in manifest.files.items()},
                "verified": {p: _rec_json(r) for p, r in manifest.files.items() if p not in bad_paths},
            })
            store.drop_manifest(name)
        raise DownloadError(
            f"offline: {len(bad)} of {len(manifest.files)} files of {name} failed verification: {'; '.join(bad[:3])}",
            hint=f"unset HF_HUB_OFFLINE, then v4 pull {name} --verify",
        )
    return PullResult(name, manifest.repo_id, manifest.revision, folder, len(manifest.files),
                      manifest.total_bytes, 0, True, offline=True, unverified=len(manifest.unverified))
