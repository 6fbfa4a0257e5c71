"""The model as planning sees it: one record per GGUF tensor, and an `Inventory` of them.

An inventory comes from a GGUF header (`Inventory.from_gguf`) or, for a recipe that has not been run, from
config.json alone (`Inventory.from_recipe`, the exact tensors `v4 quantize` would write). Nothing here reads weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGMLQuantizationType

from quant import names as N
from quant.config import ModelArgs

OTHER = "other"  # role and component of a GGUF tensor the name table does not know

# components in display order; each GGUF role maps to one, the MTP draft block's to its own two
COMPONENTS = (
    "head", "attention", "compressor", "indexer", "norms", "mhc", "router", "shared_experts", "routed_experts",
    "embedding", "mtp", "mtp_experts", OTHER,
)
_ROLE_COMPONENT = {
    N.EMBED: "embedding", N.HEAD: "head", N.NORM: "norms", N.HC: "mhc", N.SINK: "attention", N.ATTN: "attention",
    N.COMPRESSOR: "compressor", N.INDEXER: "indexer", N.ROUTER: "router", N.BIAS: "router", N.TID2EID: "router",
    N.SHEXP: "shared_experts", N.EXPS: "routed_experts", N.MTP_PROJ: "mtp",
}
EXPERT_COMPONENTS = ("routed_experts", "mtp_experts")


@dataclass(frozen=True)
class Tensor:
    """One GGUF tensor for planning: what it is, its size, and the bytes of it one decoded token reads."""

    name: str
    role: str
    component: str
    layer: int | None  # None for model-level tensors
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: rows first
    nbytes: int
    read: int  # bytes read per decoded token (v4cli.planning.traffic)

    def is_mtp(self, args: ModelArgs) -> bool:
        """Part of the MTP draft block (layer ≥ num_hidden_layers), which plain decode never runs."""
        return self.layer is not None and self.layer >= args.num_hidden_layers

    def pageable(self, args: ModelArgs) -> bool:
        """Whether it may stay on disk and be paged in on use: only what a token reads a small part of."""
        return self.role in (N.EXPS, N.EMBED, N.TID2EID) or self.is_mtp(args)


def layer_of(name: str) -> int | None:
    """The block number of a `blk.N.…` name, else None."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        return int(parts[1])
    return None


def make_tensor(args: ModelArgs, name: str, qtype, shape, nbytes: int) -> Tensor:
    """The record of one tensor of a model with `args`; role, component and read bytes follow from its name."""
    from v4cli.planning.traffic import read_per_token

    try:
        role = N.role_of_gguf(name)
    except KeyError:
        role = OTHER  # a tensor this runner does not know: read in full, never paged
    layer = layer_of(name)
    component = _ROLE_COMPONENT.get(role, OTHER)
    if layer is not None and layer >= args.num_hidden_layers and component != OTHER:
        component = "mtp_experts" if component == "routed_experts" else "mtp"
    shape = tuple(int(s) for s in shape)
    return Tensor(name, role, component, layer, GGMLQuantizationType(qtype), shape, int(nbytes),
                  read_per_token(args, role, layer, shape, int(nbytes)))


@dataclass(frozen=True)
class Inventory:
    """A model's tensors for planning, with where they came from."""

    args: ModelArgs
    tensors: tuple[Tensor, ...]
    label: str
    recipe: str | None = None  # the recipe it was made with: the GGUF's own metadata, never guessed from a name
    path: Path | None = None
    source: str | None = None  # what `v4 quantize` takes to remake it (a store name or checkpoint folder)
    config: dict | None = field(default=None, compare=False)  # the source config.json, to plan other recipes of it

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @classmethod
    def from_tensors(cls, args: ModelArgs, tensors: Iterable[tuple[str, GGMLQuantizationType, tuple[int, ...], int]],
                     label: str, recipe: str | None = None, path: Path | None = None,
                     source: str | None = None, config: dict | None = None) -> Inventory:
        """From (GGUF name, type, shape, bytes) tuples."""
        return cls(args, tuple(make_tensor(args, *t) for t in tensors), label, recipe, path, source, config)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Inventory:
        """The tensors of a `deepseek4` GGUF file or split set (headers only; nothing is read from the data)."""
        from v4cli.gguf_file import open_gguf

        with open_gguf(path) as gf:
            return cls.from_gguf_file(gf)

    @classmethod
    def from_gguf_file(cls, gf) -> Inventory:
        """From an open `GGUFModel`, so a loader that has parsed the header already need not parse it twice."""
        from quant import keys as K

        recipe = gf.metadata.get(K.Provenance.RECIPE)
        source = gf.metadata.get(K.Provenance.SOURCE_REPO)
        config = gf.metadata.get(K.Provenance.CONFIG_JSON)  # the converter keeps the source config.json verbatim
        return cls.from_tensors(gf.args, [(t.name, t.qtype, t.shape, t.nbytes) for t in gf.tensors.values()],
                                str(gf.path), recipe=recipe if isinstance(recipe, str) else None, path=gf.path,
                                source=source if isinstance(source, str) else None,
                                config=json.loads(config) if isinstance(config, str) else None)

    @classmethod
    def from_recipe(cls, cfg: dict, recipe: str, source: str | None = None) -> Inventory:
        """The exact tensors `v4 quantize SOURCE --recipe RECIPE` would write for this config.json."""
        args = ModelArgs.from_config(cfg)
        label = f"{source} quantized with {recipe}" if source else f"recipe {recipe}"
        return cls.from_tensors(args, _recipe_tensors(cfg, recipe), label, recipe=recipe, source=source, config=cfg)


_RECIPE_CACHE: dict[tuple[ModelArgs, str], tuple] = {}


def _recipe_tensors(cfg: dict, recipe: str) -> tuple:
    """(GGUF name, type, shape, bytes) of a recipe's output, memoized: planning Flash's 69k source tensors ~1 s."""
    from quant.convert import plan
    from quant.recipes import get_recipe

    key = (ModelArgs.from_config(cfg), recipe)  # the sizes follow from the args alone
    if key not in _RECIPE_CACHE:
        _RECIPE_CACHE[key] = tuple((t.gguf, t.qtype, t.shape, t.nbytes) for t in plan(cfg, get_recipe(recipe)))
    return _RECIPE_CACHE[key]
