"""The model store: one folder per pulled model, a manifest that marks it complete, and GGUF outputs.

Layout under the root (`$V4_HOME`, else `$XDG_CACHE_HOME/v4`, else `~/.cache/v4`):

    models/<folder>/                 the checkpoint files, in the repo's own layout
    models/<folder>/v4-manifest.json written last, atomically: its presence means "complete"; every file is
                                     verified except those it lists as `unverified` (the endpoint gave no hash)
    models/<folder>/.v4-partial/     while a pull is in progress: plan + resumable `<hash>.part` files
    models/.locks/<folder>.lock      one pull or removal of a model at a time
    gguf/<name>-<recipe>.gguf        outputs of `v4 quantize`
    gguf/.<file>.<pid>@<host>.partial  an output while it is written (see v4cli/partials.py)
    demo/tiny-<recipe>.gguf          `v4 demo`'s tiny random-weight model (kind "demo"), beside its checkpoint

`<folder>` is the registry name (`flash`) or `hf--OWNER--REPO` for `hf:OWNER/REPO`.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quant.config import read_config
from quant.errors import BadInput, DownloadError, NotFoundError, V4Warning
from v4cli.partials import find_partials
from v4cli.registry import (CHECKPOINT_PATTERNS, REGISTRY, HubSpec, LocalSpec, describe_model, find_gguf,
                             gguf_models, is_gguf, resolve_name)

MODEL_ENV = "V4_MODEL"  # the model to run when a command names none
MANIFEST = "v4-manifest.json"
PARTIAL = ".v4-partial"
STATE = "state.json"
MANIFEST_FORMAT = 1
_HASH_CHUNK = 8 << 20


def default_root() -> Path:
    """`$V4_HOME`, else `$XDG_CACHE_HOME/v4`, else `~/.cache/v4` (read at call time, so tests can set them)."""
    if os.environ.get("V4_HOME"):
        return Path(os.environ["V4_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "v4"


def format_bytes(n: float) -> str:
    """Decimal units, like the Hub shows sizes."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


@contextmanager
def atomic_open(path: Path):
    """A binary file that appears at `path` only when the block completes: temp file in the same folder, fsync,
    rename. Readers see the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see atomic_open)."""
    with atomic_open(path) as f:
        f.write(data)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, and harmless to skip there.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj) -> None:
    """Atomic JSON write (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# ---- file identity -------------------------------------------------------------------------------------------


def git_blob_oid(data: bytes) -> str:
    """Git's object id for a blob: what the Hub reports (and sends as ETag) for small, non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class FileRecord:
    """One file of a pulled repo: its size and the hash the Hub vouches for (LFS sha256, else git blob oid)."""

    path: str
    size: int
    sha256: str | None = None
    git_oid: str | None = None

    @property
    def key(self) -> str:
        """Content identity; also names the resumable partial file, so a partial never resumes other content."""
        return self.sha256 or self.git_oid or f"size-{self.size}"

    def hasher(self):
        """A fresh hash object for this record's check (sha256 for LFS, git blob sha1 otherwise), or None."""
        if self.sha256:
            return hashlib.sha256()
        if self.git_oid:
            h = hashlib.sha1()
            h.update(b"blob %d\0" % self.size)
            return h
        return None

    def expected_digest(self) -> str | None:
        return self.sha256 or self.git_oid


def hash_file(path: Path, record: FileRecord, upto: int | None = None):
    """Hash object for `record`'s check, fed with the first `upto` bytes of `path` (all of it by default)."""
    h = record.hasher()
    if h is None:
        return None
    remaining = path.stat().st_size if upto is None else upto
    with open(path, "rb") as f:
        while remaining > 0:
            chunk = f.read(min(_HASH_CHUNK, remaining))
            if not chunk:
                break
            h.update(chunk)
            remaining -= len(chunk)
    return h


def check_file(path: Path, record: FileRecord, full: bool = True) -> str | None:
    """None if `path` matches `record`, else what is wrong. `full=False` checks only presence and size."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != record.size:
        return f"size {size} != {record.size}"
    if full:
        h = hash_file(path, record)
        if h is not None and h.hexdigest() != record.expected_digest():
            kind = "sha256" if record.sha256 else "git blob id"
            return f"{kind} {h.hexdigest()} != {record.expected_digest()}"
    return None


# ---- manifest ------------------------------------------------------------------------------------------------


@dataclass
class Manifest:
    """What a complete pull holds. Written last, atomically; its presence is what marks the folder complete."""

    name: str
    repo_id: str
    revision: str  # the commit the files came from
    files: dict[str, FileRecord]
    requested_revision: str | None = None
    format: int = MANIFEST_FORMAT
    extra: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    @property
    def unverified(self) -> list[str]:
        """Files accepted on size alone (`v4 pull --no-verify`: the endpoint gave no hash to check them against).

        Derived from the records, so it also covers manifests written before this list existed."""
        return sorted(p for p, r in self.files.items() if r.expected_digest() is None)

    def to_json(self) -> dict:
        d = asdict(self)
        d["files"] = {p: {k: v for k, v in asdict(r).items() if k != "path"} for p, r in sorted(self.files.items())}
        d["unverified"] = self.unverified  # for readers of the file; recomputed from the records on load
        return d

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        files = {p: FileRecord(path=p, **r) for p, r in d["files"].items()}
        return cls(
            name=d["name"],
            repo_id=d["repo_id"],
            revision=d["revision"],
            files=files,
            requested_revision=d.get("requested_revision"),
            format=d.get("format", MANIFEST_FORMAT),
            extra=d.get("extra", {}),
        )


@dataclass(frozen=True)
class StoreEntry:
    """One row of `v4 ls`."""

    name: str
    kind: str  # "model" | "gguf" | "demo"
    path: Path
    size: int
    complete: bool
    repo_id: str | None = None
    revision: str | None = None
    files: int = 0
    unverified: int = 0  # of a complete model: files accepted on size alone


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class Store:
    """The on-disk model store rooted at `root` (default: `default_root()`)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    # -- paths --

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def gguf_dir(self) -> Path:
        return self.root / "gguf"

    @property
    def demo_dir(self) -> Path:
        return self.root / "demo"

    @staticmethod
    def folder_name(name: str) -> str:
        """Store key → folder name: `flash` → `flash`, `hf:owner/repo` → `hf--owner--repo`."""
        if name.startswith("hf:"):
            return "hf--" + name[3:].replace("/", "--")
        return name

    @staticmethod
    def name_from_folder(folder: str) -> str:
        if folder.startswith("hf--"):
            return "hf:" + folder[4:].replace("--", "/", 1)
        return folder

    def model_dir(self, name: str) -> Path:
        return self.models_dir / self.folder_name(name)

    def partial_dir(self, name: str) -> Path:
        return self.model_dir(name) / PARTIAL

    def lock_path(self, name: str) -> Path:
        return self.models_dir / ".locks" / f"{self.folder_name(name)}.lock"

    @contextmanager
    def lock(self, name: str):
        """Hold the per-model lock (one pull or removal at a time); fails fast if someone else holds it."""
        from filelock import Timeout
        from huggingface_hub.utils import WeakFileLock

        path = self.lock_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with WeakFileLock(path, timeout=1.0):
                yield
        except Timeout:
            raise DownloadError(f"another v4 process is pulling or removing {name}", hint="wait for it to finish")

    def gguf_path(self, name: str, recipe: str) -> Path:
        """Where `v4 quantize` writes NAME quantized with RECIPE: `<root>/gguf/<name>-<recipe>.gguf`."""
        stem = _SAFE.sub("-", f"{name}-{recipe}").strip("-")
        return self.gguf_dir / f"{stem}.gguf"

    # -- manifest / in-progress state --

    def read_manifest(self, name: str) -> Manifest | None:
        """The manifest of a complete pull, or None (never pulled, or a pull is unfinished)."""
        path = self.model_dir(name) / MANIFEST
        try:
            return Manifest.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            raise NotFoundError(f"the manifest {path} is unreadable ({e})", hint=f"v4 rm {name}, then pull again")

    def write_manifest(self, manifest: Manifest) -> None:
        atomic_write_json(self.model_dir(manifest.name) / MANIFEST, manifest.to_json())

    def drop_manifest(self, name: str) -> None:
        """Mark a folder incomplete before changing its files."""
        (self.model_dir(name) / MANIFEST).unlink(missing_ok=True)
        _fsync_dir(self.model_dir(name))

    def read_state(self, name: str) -> dict | None:
        """The plan of an unfinished pull (repo, revision, files, which are verified), or None."""
        try:
            return json.loads((self.partial_dir(name) / STATE).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def write_state(self, name: str, state: dict) -> None:
        atomic_write_json(self.partial_dir(name) / STATE, state)

    # -- queries --

    def hub_target(self, spec: HubSpec, typed: str) -> ModelTarget:
        """What a registry or hf: name is in this store (see find_model); `typed` is how the user wrote it."""
        outputs = self.outputs(spec.name)
        try:
            folder, wanted = self._pulled(spec, typed)
        except NotFoundError as e:
            return HubTarget(spec, e, outputs)
        if "config.json" in wanted:
            return CheckpointTarget(folder, spec, outputs)
        models = self._ggufs(folder, wanted)
        if len(models) > 1:
            repo = f"hf:{spec.repo_id}" if spec.name.startswith("hf:") else spec.name
            names = ", ".join(f"{repo}:{describe_model(m)}" for m in models)
            raise BadInput(f"{typed} holds {len(models)} GGUF models: {names}", hint="name one of them")
        return GGUFTarget(folder / models[0][0] if models else find_gguf(folder), "store")

    def outputs(self, name: str) -> tuple[Path, ...]:
        """The `v4 quantize` outputs of the model `name` (store key or checkpoint folder name): NAME-RECIPE.gguf."""
        folder = self.folder_name(name)
        if not self.gguf_dir.is_dir() or "/" in folder or "\\" in folder:  # a path names no outputs
            return ()
        return tuple(sorted(self.gguf_dir.glob(f"{glob.escape(folder)}-*.gguf")))

    def default_gguf(self) -> GGUFTarget:
        """The model to run when none is named: the store's only GGUF, else `v4 demo`'s (with a warning)."""
        found = self._stored_ggufs()
        origin = "store"
        if not found:  # `v4 demo`'s model only when the store holds nothing real
            found, origin = [e.path for e in self.list() if e.kind == "demo"], "demo"
            if len(found) == 1:
                warnings.warn(V4Warning(f"no model given: using {found[0].stem}, v4 demo's tiny random-weight model "
                                        "(its answers are noise; v4 pull flash gets the real one)"))
        if len(found) == 1:
            return GGUFTarget(found[0], origin)
        if not found:
            raise NotFoundError("no model given and the store holds no GGUF",
                                hint=f"pass a GGUF path or set ${MODEL_ENV}; `v4 quantize flash` makes one, "
                                     "`v4 demo` a tiny one")
        names = ", ".join(p.name for p in found)
        raise BadInput(f"no model given and the store holds {len(found)} GGUFs: {names}",
                       hint=f"name one, or set ${MODEL_ENV}")

    def _stored_ggufs(self) -> list[Path]:
        """Every GGUF the store can run: `v4 quantize` outputs and pulled ready-made GGUF repos."""
        out = []
        for e in self.list():
            if e.kind == "gguf":
                out.append(e.path)
            elif e.kind == "model" and e.complete:
                try:
                    out += self.gguf_models(e.name)
                except NotFoundError:
                    continue
        return out

    def gguf_models(self, name: str) -> list[Path]:
        """Every GGUF model of a pulled repo, each as its file or its split set's first part; [] for a checkpoint."""
        spec = resolve_name(name)
        if isinstance(spec, LocalSpec):
            raise BadInput(f"{name} is a local path, not a stored model", hint="v4 ls shows what the store holds")
        folder, wanted = self._pulled(spec, name)
        return [] if "config.json" in wanted else [folder / m[0] for m in self._ggufs(folder, wanted)]

    @staticmethod
    def _ggufs(folder: Path, files: list[str]) -> list[list[Path]]:
        return gguf_models(Path(p) for p in files if is_gguf(folder / p))

    def _pulled(self, spec: HubSpec, typed: str) -> tuple[Path, list[str]]:
        """(folder, files the spec's patterns select) of a complete pull; NotFoundError if it is not one."""
        manifest = self.read_manifest(spec.name)
        if manifest is None:
            state = "is only partly pulled" if self.model_dir(spec.name).exists() else "has not been pulled"
            raise NotFoundError(f"{typed} {state}", hint=f"v4 pull {typed}")
        if spec.revision is not None and manifest.revision != spec.revision:
            raise NotFoundError(
                f"{typed} is stored at revision {manifest.revision[:7]}, not {spec.revision[:7]}",
                hint=f"v4 pull {typed}",
            )
        folder = self.model_dir(spec.name)
        wanted = sorted(p for p in manifest.files if any(fnmatch.fnmatchcase(p, pat) for pat in spec.patterns))
        if not wanted and spec.patterns == CHECKPOINT_PATTERNS:
            wanted = sorted(manifest.files)  # hf:OWNER/REPO with no pattern after a pattern pull of its GGUFs
        if not wanted:
            raise NotFoundError(f"no files of {typed} are in the store", hint=f"v4 pull {typed}")
        # A cheap stat check catches files deleted by hand; full hashes are `v4 pull` offline's job.
        for p in wanted:
            problem = check_file(folder / p, manifest.files[p], full=False)
            if problem:
                raise NotFoundError(f"{typed}: {p} is {problem}", hint=f"v4 pull {typed}")
        return folder, wanted

    def list(self) -> list[StoreEntry]:
        """Every model folder (complete or not), every GGUF output, and unfinished quantize outputs."""
        out: list[StoreEntry] = []
        if self.models_dir.is_dir():
            for d in sorted(self.models_dir.iterdir()):
                if not d.is_dir() or d.name.startswith("."):
                    continue
                name = self.name_from_folder(d.name)
                manifest = self.read_manifest(name)
                if manifest is not None:
                    out.append(
                        StoreEntry(name, "model", d, manifest.total_bytes, True, manifest.repo_id,
                                   manifest.revision, len(manifest.files), len(manifest.unverified))
                    )
                else:
                    state = self.read_state(name) or {}
                    files = [p for p in d.rglob("*") if p.is_file()]
                    out.append(
                        StoreEntry(name, "model", d, sum(p.stat().st_size for p in files), False,
                                   state.get("repo_id"), state.get("revision"), len(state.get("files", {})))
                    )
        for kind, folder in (("gguf", self.gguf_dir), ("demo", self.demo_dir)):
            if folder.is_dir():
                for p in sorted(folder.glob("*.gguf")):
                    out.append(StoreEntry(p.name, kind, p, p.stat().st_size, True, files=1))
        # hidden `.NAME.PID@HOST.partial` files of quantize runs still writing or killed (`v4 quantize` removes
        # those whose writer died on this machine): listed so that a 150 GB leftover is never invisible
        for part in find_partials(self.gguf_dir):
            out.append(StoreEntry(part.path.name, "unfinished", part.path, part.size, False, files=1))
        return out

    def file_entry(self, name: str) -> StoreEntry | None:
        """The GGUF output or demo model `name` (its file name, `.gguf` optional), else None."""
        for e in self.list():
            if e.kind in ("gguf", "demo") and name in (e.name, e.path.stem):
                return e
        return None

    def entry(self, name: str) -> StoreEntry:
        """The stored model (by store name, e.g. `flash`, `hf:owner/repo`) or GGUF file (by file name, `.gguf`
        optional: `v4 quantize` names outputs NAME-RECIPE, so a stem never shadows a model's name)."""
        found = self.file_entry(name)
        if found is not None:
            return found
        entries = self.list()
        spec = resolve_name(name) if not name.endswith(".gguf") else None
        if isinstance(spec, LocalSpec):
            raise BadInput(f"{name} is a local path, not a stored model", hint="v4 ls shows what the store holds")
        key = spec.name if isinstance(spec, HubSpec) else name
        for e in entries:
            if e.kind == "model" and e.name == key:
                return e
        hint = "v4 ls shows what it holds" if entries else "the store is empty"
        raise NotFoundError(f"{name} is not in the store", hint=hint)

    def remove(self, name: str) -> StoreEntry:
        """Delete a stored model folder or GGUF output (see `entry`); returns what went."""
        e = self.entry(name)
        if e.kind == "gguf":
            e.path.unlink()
        elif e.kind == "demo":
            e.path.unlink()
            if not any(self.demo_dir.glob("*.gguf")):  # the checkpoint only feeds the demo's GGUFs
                shutil.rmtree(self.demo_dir)
        else:
            with self.lock(e.name):
                shutil.rmtree(e.path)
        return e


# ---- which model a name means: the one resolver behind every command that takes a model ----


@dataclass(frozen=True)
class GGUFTarget:
    """A GGUF model: `path` is its file, or the first part of a split set (opening it finds the rest)."""

    path: Path
    origin: str  # "path" (typed), "store" (a pulled GGUF repo or a `v4 quantize` output) or "demo" (`v4 demo`'s)


@dataclass(frozen=True)
class CheckpointTarget:
    """An official checkpoint folder (config.json + safetensors): typed, or a pulled registry / hf: model."""

    path: Path
    spec: HubSpec | None  # the pulled model's registry entry; None for a folder typed as a path
    outputs: tuple[Path, ...] = ()  # its `v4 quantize` outputs in the store

    def config(self) -> dict:
        """Its config.json, checked (CheckpointError naming what is wrong)."""
        return read_config(self.path / "config.json")


@dataclass(frozen=True)
class HubTarget:
    """A registry or hf: name whose files are not (completely) in the store; `spec.config` is its config when
    known without a download (Flash's)."""

    spec: HubSpec
    not_pulled: NotFoundError  # raised where its files are needed: it names `v4 pull`
    outputs: tuple[Path, ...] = ()


ModelTarget = GGUFTarget | CheckpointTarget | HubTarget


def find_model(name: str | None, store: Store | None = None) -> ModelTarget:
    """What the model `name` is, judged by content and the store, never by the look of the name.

    In order: no name → `$V4_MODEL`, else the store's only GGUF (v4 demo's when the store holds nothing else); a
    registry or hf: name → the pulled model or a HubTarget; a path → a checkpoint folder or GGUF (a file, any part
    of a split set, a folder holding one model); a store GGUF by its `v4 ls` name; a name with one quantize
    output. NotFoundError (with suggestions) or BadInput otherwise."""
    store = store or Store()
    name = name or os.environ.get(MODEL_ENV) or None
    if not name:
        return store.default_gguf()
    known = name.startswith("hf:") or name.lower() in REGISTRY
    if not known and not Path(name).expanduser().exists():
        stored = store.file_entry(name)  # by its `v4 ls` name: a GGUF output or demo model
        if stored is not None:
            return GGUFTarget(stored.path, "demo" if stored.kind == "demo" else "store")
        outputs = store.outputs(name)  # a typed checkpoint folder's outputs are named after the folder
        if outputs:
            return _one_output(name, outputs)
    spec = resolve_name(name)
    if isinstance(spec, HubSpec):
        return store.hub_target(spec, name)
    if spec.kind == "checkpoint":
        return CheckpointTarget(spec.path, None, store.outputs(spec.path.name))
    return GGUFTarget(find_gguf(spec.path) if spec.path.is_dir() else spec.path, "path")


def find_gguf_model(name: str | None, store: Store | None = None) -> Path:
    """The GGUF to run for `name` (see find_model): a GGUF's file, else the model's one quantize output."""
    target = find_model(name, store)
    if isinstance(target, GGUFTarget):
        return target.path
    if target.outputs:
        return _one_output(name, target.outputs).path
    if isinstance(target, CheckpointTarget):
        raise BadInput(f"{name} is a checkpoint, not a GGUF", hint=f"v4 quantize {name}, then run the GGUF")
    raise target.not_pulled


def _one_output(name: str, outputs: tuple[Path, ...]) -> GGUFTarget:
    if len(outputs) > 1:
        raise BadInput(f"{name} has {len(outputs)} quantized outputs: {', '.join(p.name for p in outputs)}",
                       hint="name one of them")
    return GGUFTarget(outputs[0], "store")


def gguf_path(name: str, recipe: str) -> Path:
    """`Store().gguf_path(name, recipe)` on the default store."""
    return Store().gguf_path(name, recipe)
