"""Model names → typed specs: registry names, `hf:OWNER/REPO[:PATTERN]`, and local paths.

The registry is the one place that knows which Hub repo and revision a short name means.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from v4cli.errors import BadInput, NotFoundError

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


@dataclass(frozen=True)
class LocalSpec:
    """A checkpoint directory (with config.json) or a GGUF file already on disk; never pulled."""

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
        ),
        HubSpec(
            "flash-base",
            "deepseek-ai/DeepSeek-V4-Flash-Base",
            None,
            CHECKPOINT_PATTERNS,
            "DeepSeek-V4-Flash base model",
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


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "/" in name or "\\" in name or name.endswith(".gguf")


def _local_kind(path: Path) -> str | None:
    """What a local path holds, judged by content (config.json, GGUF magic), never by its name."""
    if path.is_dir():
        return "checkpoint" if (path / "config.json").is_file() else None
    if path.is_file():
        with open(path, "rb") as f:
            return "gguf" if f.read(4) == GGUF_MAGIC else None
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
