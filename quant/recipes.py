"""Quantization recipes as data: which ggml type each role of tensor gets.

`SOURCE` keeps a tensor exact: BF16 for FP8/BF16 sources (FP8 × a power-of-two scale fits BF16 exactly), F32 for
F32 sources. Routed experts (the bulk of the model: 277G of Flash's 284B parameters) get their own per-projection
types, since they dominate both file size and bytes read per decoded token.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType

from quant import names as N
from quant.ggml import type_info
from quant.official import F32
from quant.errors import BadInput

SOURCE = "source"


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    roles: dict[str, str]  # role → ggml type name or SOURCE
    experts: dict[str, str]  # "gate" / "up" / "down" → ggml type name or SOURCE (MXFP4 = the official FP4 bits)
    overrides: tuple[tuple[str, str], ...] = field(default=())  # (glob on GGUF name, type), last match wins
    # the last `late_share` of the layers (at least one when > 0; the MTP block counts as late) take `late` for
    # their experts instead: every published low-bit V4 recipe protects the late layers, whose errors have the
    # fewest layers left to be corrected in and reach the head most directly
    late: dict[str, str] | None = None
    late_share: float = 0.0

    def types(self) -> set[str]:
        """Every ggml type name the recipe can write (before the size fallbacks)."""
        return {t for t in (*self.roles.values(), *self.experts.values(), *(self.late or {}).values(),
                            *(t for _, t in self.overrides)) if t != SOURCE}

    @property
    def needs_imatrix(self) -> bool:
        """It writes a type llama.cpp only writes with an importance matrix."""
        return any(type_info(t).imatrix_only for t in self.types())

    def late_from(self, n_layers: int) -> int:
        """The first layer whose experts take `late`."""
        if not self.late or self.late_share <= 0:
            return n_layers + 1
        return n_layers - max(1, round(self.late_share * n_layers))


# roles that are always kept at full precision whatever the recipe: tiny, and numerically sensitive
_ALWAYS: dict[str, str] = {N.NORM: "F32", N.HC: "F32", N.SINK: "F32", N.BIAS: "F32", N.TID2EID: "I32"}

_Q8_NONEXPERT = {N.EMBED: "Q8_0", N.HEAD: "Q8_0", N.ATTN: "Q8_0", N.SHEXP: "Q8_0", N.INDEXER: "Q8_0",
                 N.MTP_PROJ: "Q8_0", N.ROUTER: SOURCE, N.COMPRESSOR: SOURCE}


def _lowbit(name: str, gate: str, down: str, summary: str, late: tuple[str, str] | None = None) -> Recipe:
    """Q8_0 attention, shared experts, indexer, embedding and head (with the router and compressors kept exact: the
    protected ~8 GB of Flash); the routed experts at `gate` (gate and up) / `down`, and `late` for the last 6 of 43
    layers."""
    return Recipe(name, summary, _Q8_NONEXPERT, {"gate": gate, "up": gate, "down": down},
                  late=None if late is None else {"gate": late[0], "up": late[0], "down": late[1]},
                  late_share=0.0 if late is None else LATE_SHARE)


LATE_SHARE = 6 / 43  # ds4's q2-q4 (layers 37–42 of Flash's 43)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("f32", "everything F32: for debugging and exact comparisons",
           {r: "F32" for r in (N.EMBED, N.HEAD, N.ATTN, N.SHEXP, N.INDEXER, N.MTP_PROJ, N.ROUTER, N.COMPRESSOR)},
           {"gate": "F32", "up": "F32", "down": "F32"}),
    Recipe("lossless", "exact: FP8 → BF16, FP4 → MXFP4 bit repack, BF16/F32 kept",
           {r: SOURCE for r in (N.EMBED, N.HEAD, N.ATTN, N.SHEXP, N.INDEXER, N.MTP_PROJ, N.ROUTER, N.COMPRESSOR)},
           {"gate": "MXFP4", "up": "MXFP4", "down": "MXFP4"}),
    Recipe("q8", "llama.cpp converter's choice: FP8 → Q8_0, BF16 kept, experts MXFP4 (exact)",
           {N.EMBED: SOURCE, N.HEAD: SOURCE, N.ATTN: "Q8_0", N.SHEXP: "Q8_0", N.INDEXER: "Q8_0",
            N.MTP_PROJ: "Q8_0", N.ROUTER: SOURCE, N.COMPRESSOR: SOURCE},
           {"gate": "MXFP4", "up": "MXFP4", "down": "MXFP4"}),
    _lowbit("q4k", "Q4_K", "Q4_K", "experts Q4_K, the rest Q8_0/BF16/F32"),
    _lowbit("q3k", "Q3_K", "Q3_K", "experts Q3_K, the rest Q8_0/BF16/F32"),
    _lowbit("q2k-q3k", "Q2_K", "Q3_K", "experts gate/up Q2_K + down Q3_K, the rest Q8_0/BF16/F32"),
    _lowbit("q2k", "Q2_K", "Q2_K", "experts Q2_K, the rest Q8_0/BF16/F32 (fits 128 GB with 1M context)"),
    # imatrix-guided I-quant mixes at the sizes that matter on 128 GB (sizes for Flash; README has the table)
    _lowbit("iq3-108", "IQ2_S", "IQ3_S", "~108 GB: experts gate/up IQ2_S + down IQ3_S, last layers' gate/up IQ3_XXS",
            late=("IQ3_XXS", "IQ3_S")),
    _lowbit("iq2-100", "IQ2_XS", "IQ3_XXS", "~100 GB: experts gate/up IQ2_XS + down IQ3_XXS, last layers' "
            "gate/up IQ3_XXS", late=("IQ3_XXS", "IQ3_XXS")),
    _lowbit("iq2-90", "IQ2_XXS", "IQ3_XXS", "~90 GB: experts gate/up IQ2_XXS + down IQ3_XXS, last layers "
            "gate/up IQ2_S", late=("IQ2_S", "IQ3_XXS")),
    _lowbit("iq2-80", "IQ2_XXS", "IQ2_XXS", "~80 GB: experts IQ2_XXS, last layers' down IQ3_XXS",
            late=("IQ2_XXS", "IQ3_XXS")),
)}

_EXPERT_PROJ = {N.EXPERTS["w1"]: "gate", N.EXPERTS["w3"]: "up", N.EXPERTS["w2"]: "down"}
_FALLBACK = ("Q8_0", "BF16", "F32")  # when a row length is not a whole number of the chosen type's blocks


def get_recipe(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A recipe by name, with `PATTERN=TYPE` overrides (glob on GGUF tensor names) appended."""
    try:
        base = RECIPES[name]
    except KeyError:
        raise BadInput(f"unknown recipe {name!r}", hint=f"choose one of: {', '.join(RECIPES)}") from None
    parsed = []
    for o in overrides:
        pat, sep, typ = o.partition("=")
        if not sep or not pat or not typ:
            raise BadInput(f"--tensor-type {o!r}: expected PATTERN=TYPE, e.g. 'blk.*.ffn_down_exps.weight=Q3_K'")
        type_info(typ)  # raises for unknown types
        parsed.append((pat, typ.upper()))
    return Recipe(base.name, base.summary, base.roles, base.experts, base.overrides + tuple(parsed), base.late,
                  base.late_share)


def choose_type(recipe: Recipe, gguf_name: str, role: str, source_dtype: str, shape: tuple[int, ...],
                n_layers: int = 0) -> QT:
    """The ggml type of one GGUF tensor under `recipe`, in a model of `n_layers` layers (for `Recipe.late`)."""
    if len(shape) == 1:
        typ = "F32"  # llama.cpp's rule: every 1-D tensor is F32
    elif role in _ALWAYS:
        typ = _ALWAYS[role]
    elif gguf_name.endswith("_ape.weight"):
        typ = "F32"
    elif role == N.EXPS:
        layer = int(gguf_name.split(".", 2)[1])
        experts = recipe.late if layer >= recipe.late_from(n_layers) else recipe.experts
        typ = experts[_EXPERT_PROJ[gguf_name.split(".", 2)[2]]]
    else:
        typ = recipe.roles[role]
    if typ == SOURCE:
        typ = "F32" if source_dtype == F32 else "BF16"
    explicit = False
    for pat, t in recipe.overrides:
        if fnmatch.fnmatchcase(gguf_name, pat):
            typ, explicit = t, True
    info = type_info(typ)
    if shape[-1] % info.block_size:
        if explicit:
            raise BadInput(f"--tensor-type: {gguf_name} has rows of {shape[-1]}, not a multiple of the "
                           f"{info.name} block size {info.block_size}")
        info = next(type_info(f) for f in _FALLBACK if shape[-1] % type_info(f).block_size == 0)
    return info.qtype


# llama-quantize's file type for a file of mostly one ggml type, where it is not MOSTLY_<type>: its Q3_K/Q4_K/Q5_K
# are aliases of the _M mixes, and its converter names Q8_0/BF16 + MXFP4-experts files MXFP4_MOE.
_FILE_TYPE_NAME = {"F32": "ALL_F32", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M",
                   "MXFP4": "MOSTLY_MXFP4_MOE"}


def file_type(weights: Iterable[tuple[QT, int]]) -> LlamaFileType:
    """`general.file_type`: the llama.cpp file type named after the type most weights are stored in.

    `weights` is (ggml type, number of weights) per tensor; the I32 routing table does not count.
    """
    count: Counter[QT] = Counter()
    for qtype, n in weights:
        if qtype != QT.I32:
            count[qtype] += n
    if not count:
        raise BadInput("no weights to name a file type after")
    dominant = count.most_common(1)[0][0].name
    return LlamaFileType[_FILE_TYPE_NAME.get(dominant, f"MOSTLY_{dominant}")]


# Best quality first: `--fit` takes the first whose file fits the budget (skipping those that need an importance
# matrix when none is given). No q4k: the routed experts were trained at FP4, so MXFP4 (lossless, q8) is both exact
# and smaller than Q4_K of the same weights. An imatrix-guided I-quant mix is ahead of the plain K-quant mix of about
# its size (benchmarks/recipe_quality.py measures each pair on the trained tiny model).
FIT_ORDER = ("lossless", "q8", "q3k", "iq3-108", "q2k-q3k", "iq2-100", "q2k", "iq2-90", "iq2-80")

