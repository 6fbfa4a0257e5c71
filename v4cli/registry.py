"""Model names → typed specs: registry names, `hf:OWNER/REPO[:PATTERN]`, and local paths.

The registry is the one place that knows which Hub repo and revision a short name means.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from quant.config import FLASH_CONFIG
from quant.errors import BadInput, NotFoundError

# Only what the runner reads from an official checkpoint; everything else in the repo (README, figures,
# inference/ code, LICENSE) is skipped.
CHECKPOINT_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "encoding/*.py",
)

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class HubSpec:
    """A model that lives on the Hub and is pulled into the store under `name`."""

    name: str  # store key: "flash" or "hf:owner/repo"
    repo_id: str
    revision: str | None  # None = the repo's default branch
    patterns: tuple[str, ...]
    description: str = ""
    # its config.json when known without a download (planning and `quantize --dry-run` need no pull)
    config: dict | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class LocalSpec:
    """A checkpoint directory (with config.json), a GGUF file or a folder of GGUF parts on disk; never pulled."""

    path: Path
    kind: str  # "checkpoint" | "gguf"


ModelSpec = HubSpec | LocalSpec

REGISTRY: dict[str, HubSpec] = {
    s.name: s
    for s in (
        HubSpec(
            "flash",
            "deepseek-ai/DeepSeek-V4-Flash",
            "60d8d70770c6776ff598c94bb586a859a38244f1",
            CHECKPOINT_PATTERNS,
            "DeepSeek-V4-Flash, instruct (284B MoE, 13B active)",
            FLASH_CONFIG,
        ),
        HubSpec(
            "flash-base",
            "deepseek-ai/DeepSeek-V4-Flash-Base",
            None,
            CHECKPOINT_PATTERNS,
            "DeepSeek-V4-Flash base model",
            FLASH_CONFIG,  # the same architecture as the instruct model
        ),
        HubSpec(
            "flash-0731",
            "deepseek-ai/DeepSeek-V4-Flash-0731",
            None,
            CHECKPOINT_PATTERNS,
            "DeepSeek-V4-Flash 0731 post-training update",
        ),
        HubSpec(
            "pro",
            "deepseek-ai/DeepSeek-V4-Pro",
            None,
            CHECKPOINT_PATTERNS,
            "DeepSeek-V4-Pro (1.6T MoE, 49B active)",
        ),
    )
}

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hf_store_name(repo_id: str) -> str:
    """The store key for an `hf:` repo (the pattern is not part of it: one folder per repo)."""
    return f"hf:{repo_id}"


def _parse_hf(name: str) -> HubSpec:
    body = name[len("hf:") :]
    repo_id, _, pattern = body.partition(":")
    if not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise BadInput(
            f"'{name}' is not a Hub repo name",
            hint="write it as hf:OWNER/REPO or hf:OWNER/REPO:PATTERN, e.g. hf:unsloth/Foo-GGUF:*Q2_K*.gguf",
        )
    patterns = (pattern,) if pattern else CHECKPOINT_PATTERNS
    return HubSpec(hf_store_name(repo_id), repo_id, None, patterns)


# llama.cpp's split sets (llama_split_path): NAME-00001-of-00003.gguf, … ; 5 digits hold any u16 count
_SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_path(prefix: str | Path, no: int, count: int) -> Path:
    """Part `no` (0-based) of a `count`-part set: `PREFIX-0000{no+1}-of-0000{count}.gguf` (llama_split_path)."""
    return Path(f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf")


def parse_split_name(path: str | Path) -> tuple[Path, int, int] | None:
    """(prefix, 0-based part number, part count) of a path named by llama.cpp's split convention, else None."""
    path = Path(path)
    m = _SPLIT_NAME.match(path.name)
    if m is None:
        return None
    no, count = int(m["no"]) - 1, int(m["count"])
    return (path.with_name(m["stem"]), no, count) if 0 <= no < count else None


def is_gguf(path: Path) -> bool:
    """Judged by the magic, never by the name."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def gguf_models(paths: Iterable[str | Path]) -> list[list[Path]]:
    """GGUF files grouped into models: the parts of one split set (same prefix and count) together, in part
    order; every other file alone. Sorted by first path."""
    sets: dict[tuple[Path, int], list[Path]] = {}
    out: list[list[Path]] = []
    for p in map(Path, paths):
        split = parse_split_name(p)
        if split is None:
            out.append([p])
        else:
            sets.setdefault((split[0], split[2]), []).append(p)
    out += [sorted(parts, key=lambda p: parse_split_name(p)[1]) for parts in sets.values()]
    return sorted(out, key=lambda parts: str(parts[0]))


def describe_model(parts: list[Path], root: Path | None = None) -> str:
    """One model of `gguf_models` in a listing: its file, or a glob matching every part of its set."""
    first = parts[0] if root is None else parts[0].relative_to(root)
    split = parse_split_name(first)
    return str(first) if split is None else f"{split[0]}-*-of-{split[2]:05d}.gguf"


def find_gguf(folder: Path) -> Path:
    """The GGUF to open for a folder that holds one model (a file, or the parts of one split set): the file, or the
    lowest part present (opening it finds the rest). NotFoundError if it holds none, BadInput if several."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_gguf(p))
    models = gguf_models(files)
    if not models:
        raise NotFoundError(f"{folder} holds no GGUF file",
                            hint="pass a GGUF file, a folder with one model's parts, or a checkpoint folder")
    if len(models) > 1:
        names = ", ".join(describe_model(m, folder) for m in models)
        raise BadInput(f"{folder} holds {len(models)} GGUF models: {names}", hint="pass the path of one of them")
    return models[0][0]


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "/" in name or "\\" in name or name.endswith(".gguf")


def _local_kind(path: Path) -> str | None:
    """What a local path holds, judged by content (config.json, GGUF magic), never by its name."""
    if path.is_dir():
        if (path / "config.json").is_file():
            return "checkpoint"
        return "gguf" if any(p.is_file() and is_gguf(p) for p in path.iterdir()) else None
    if path.is_file():
        return "gguf" if is_gguf(path) else None
    return None


def resolve_name(name: str) -> ModelSpec:
    """Turn what the user typed into a typed spec; unknown names raise NotFoundError with suggestions."""
    if name.startswith("hf:"):
        return _parse_hf(name)
    key = name.lower()
    if key in REGISTRY:
        return REGISTRY[key]
    path = Path(name).expanduser()
    if path.exists() or _looks_like_path(name):
        kind = _local_kind(path)
        if kind is None:
            what = "is neither a checkpoint folder (config.json) nor a GGUF file"
            if not path.exists():
                what = "does not exist"
            raise NotFoundError(f"{name} {what}")
        return LocalSpec(path.resolve(), kind)
    close = difflib.get_close_matches(key, list(REGISTRY), n=3, cutoff=0.5)
    if close:
        hint = f"did you mean {close[0] if len(close) == 1 else ', '.join(close[:-1]) + ' or ' + close[-1]}?"
    else:
        hint = f"known names: {', '.join(REGISTRY)}; or hf:OWNER/REPO"
    raise NotFoundError(f"unknown model '{name}'", hint=hint)
