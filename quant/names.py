"""The one mapping table between official checkpoint names and GGUF `deepseek4` names.

Every other module asks this table; no tensor name is spelled anywhere else. Each entry also
carries a `role`, which recipes use to choose a ggml type (quant formats and recipes are data).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# role names (what a recipe keys on)
EMBED, HEAD, NORM, HC, SINK, ATTN, COMPRESSOR, INDEXER, ROUTER, BIAS, TID2EID, SHEXP, EXPS, MTP_PROJ = (
    "embed", "head", "norm", "hc", "sink", "attn", "compressor", "indexer", "router", "bias", "tid2eid",
    "shexp", "exps", "mtp_proj",
)

# official (no `model.` prefix) → GGUF, model-level tensors
ROOT: dict[str, tuple[str, str]] = {
    "embed.weight": ("token_embd.weight", EMBED),
    "head.weight": ("output.weight", HEAD),
    "norm.weight": ("output_norm.weight", NORM),
    "hc_head_fn": ("output_hc_fn.weight", HC),
    "hc_head_base": ("output_hc_base.weight", HC),
    "hc_head_scale": ("output_hc_scale.weight", HC),
}

# official `layers.N.<key>` → GGUF `blk.N.<value>`
LAYER: dict[str, tuple[str, str]] = {
    "attn_norm.weight": ("attn_norm.weight", NORM),
    "ffn_norm.weight": ("ffn_norm.weight", NORM),
    "hc_attn_fn": ("hc_attn_fn.weight", HC),
    "hc_attn_base": ("hc_attn_base.weight", HC),
    "hc_attn_scale": ("hc_attn_scale.weight", HC),
    "hc_ffn_fn": ("hc_ffn_fn.weight", HC),
    "hc_ffn_base": ("hc_ffn_base.weight", HC),
    "hc_ffn_scale": ("hc_ffn_scale.weight", HC),
    "attn.attn_sink": ("attn_sinks.weight", SINK),
    "attn.wq_a.weight": ("attn_q_a.weight", ATTN),
    "attn.q_norm.weight": ("attn_q_a_norm.weight", NORM),
    "attn.wq_b.weight": ("attn_q_b.weight", ATTN),
    "attn.wkv.weight": ("attn_kv.weight", ATTN),
    "attn.kv_norm.weight": ("attn_kv_a_norm.weight", NORM),
    "attn.wo_a.weight": ("attn_output_a.weight", ATTN),
    "attn.wo_b.weight": ("attn_output_b.weight", ATTN),
    "attn.compressor.wkv.weight": ("attn_compressor_kv.weight", COMPRESSOR),
    "attn.compressor.wgate.weight": ("attn_compressor_gate.weight", COMPRESSOR),
    "attn.compressor.ape": ("attn_compressor_ape.weight", COMPRESSOR),
    "attn.compressor.norm.weight": ("attn_compressor_norm.weight", NORM),
    "attn.indexer.wq_b.weight": ("indexer.attn_q_b.weight", INDEXER),
    "attn.indexer.weights_proj.weight": ("indexer.proj.weight", INDEXER),
    "attn.indexer.compressor.wkv.weight": ("indexer_compressor_kv.weight", INDEXER),
    "attn.indexer.compressor.wgate.weight": ("indexer_compressor_gate.weight", INDEXER),
    "attn.indexer.compressor.ape": ("indexer_compressor_ape.weight", INDEXER),
    "attn.indexer.compressor.norm.weight": ("indexer_compressor_norm.weight", NORM),
    "ffn.gate.weight": ("ffn_gate_inp.weight", ROUTER),
    "ffn.gate.bias": ("exp_probs_b.bias", BIAS),
    "ffn.gate.tid2eid": ("ffn_gate_tid2eid.weight", TID2EID),
    "ffn.shared_experts.w1.weight": ("ffn_gate_shexp.weight", SHEXP),
    "ffn.shared_experts.w3.weight": ("ffn_up_shexp.weight", SHEXP),
    "ffn.shared_experts.w2.weight": ("ffn_down_shexp.weight", SHEXP),
}

# routed experts: official per-expert `layers.N.ffn.experts.E.<w>.weight` stack into one 3-D GGUF tensor
EXPERTS: dict[str, str] = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}

# MTP block `mtp.0.<key>` → in llama.cpp's separate MTP file, block n_layers (`blk.{n}.`) or the root
MTP_ONLY: dict[str, tuple[str, str]] = {
    "enorm.weight": ("nextn.enorm.weight", NORM),
    "hnorm.weight": ("nextn.hnorm.weight", NORM),
    "norm.weight": ("nextn.shared_head_norm.weight", NORM),
}
MTP_EH_PROJ = "nextn.eh_proj.weight"  # concat(e_proj, h_proj) along the input dim
MTP_EH_SOURCES = ("e_proj.weight", "h_proj.weight")  # in that order: the draft input is [enorm(e) | hnorm(h)]
MTP_ROOT_HC = ("hc_head_fn", "hc_head_base", "hc_head_scale")  # become the MTP file's root output_hc_*
MTP_SHARED_ROOT = ("embed.weight", "norm.weight", "head.weight")  # the trunk's; llama.cpp reads them from the MTP file

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_MTP_RE = re.compile(r"^mtp\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)$")


def root(official: str) -> str:
    return ROOT[official][0]


def blk(layer: int, official_suffix: str) -> str:
    """GGUF name of `layers.{layer}.{official_suffix}`."""
    return f"blk.{layer}.{LAYER[official_suffix][0]}"


def experts(layer: int, w: str) -> str:
    return f"blk.{layer}.{EXPERTS[w]}"


def official_expert(layer: int, expert: int, w: str, part: str = "weight", *, n_layers: int | None = None) -> str:
    """Official name of one routed expert's tensor; with `n_layers`, a layer ≥ it is MTP block layer − n_layers."""
    block = f"mtp.{layer - n_layers}" if n_layers is not None and layer >= n_layers else f"layers.{layer}"
    return f"{block}.ffn.experts.{expert}.{w}.{part}"


def official_layer(layer: int, suffix: str) -> str:
    return f"layers.{layer}.{suffix}"


def official_mtp(m: int, suffix: str) -> str:
    """Official name of MTP block m's tensor `suffix` (its block tensors use the same suffixes as a layer)."""
    return f"mtp.{m}.{suffix}"


def in_mtp_file(official: str) -> bool:
    """Whether llama.cpp's separate draft file holds this official tensor (MTP block 0, or a shared root one)."""
    return official.startswith(official_mtp(0, "")) or official in MTP_SHARED_ROOT


def mtp_blk(layer: int, official_suffix: str) -> str:
    """GGUF name of an MTP-only tensor (enorm, hnorm, norm) of the draft block numbered `layer`."""
    return f"blk.{layer}.{MTP_ONLY[official_suffix][0]}"


def mtp_eh_proj(layer: int) -> str:
    return f"blk.{layer}.{MTP_EH_PROJ}"


@dataclass(frozen=True)
class Mapped:
    gguf: str
    role: str
    layer: int | None


def to_gguf(official: str) -> Mapped:
    """Map one official (non-expert, non-scale) tensor name. Raises KeyError for names the table lacks."""
    if official in ROOT:
        g, role = ROOT[official]
        return Mapped(g, role, None)
    m = _LAYER_RE.match(official)
    if m and m.group(2) in LAYER:
        layer = int(m.group(1))
        g, role = LAYER[m.group(2)]
        return Mapped(f"blk.{layer}.{g}", role, layer)
    raise KeyError(official)


def mtp_to_gguf(official: str, n_layers: int) -> Mapped:
    """Map one `mtp.M.*` tensor (not an expert, not e/h_proj) to llama.cpp's separate MTP file: block
    n_layers + M, except the draft's own hc_head, which becomes that file's root output_hc_*."""
    m = _MTP_RE.match(official)
    if not m:
        raise KeyError(official)
    layer, suffix = n_layers + int(m.group(1)), m.group(2)
    if suffix in MTP_ROOT_HC:
        g, role = ROOT[suffix]
        return Mapped(g, role, None)
    if suffix in MTP_ONLY:
        g, role = MTP_ONLY[suffix]
    elif suffix in LAYER:
        g, role = LAYER[suffix]
    else:
        raise KeyError(official)
    return Mapped(f"blk.{layer}.{g}", role, layer)


def parse_expert(official: str) -> tuple[int, int, str, str] | None:
    """`layers.L.ffn.experts.E.wK.(weight|scale)` → (L, E, wK, part), else None."""
    m = _EXPERT_RE.match(official)
    return (int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)) if m else None


def role_of_gguf(name: str) -> str:
    """Role of a GGUF tensor name (for recipes applied to GGUF inventories)."""
    for g, role in ROOT.values():
        if name == g:
            return role
    rest = name.split(".", 2)[2] if name.startswith("blk.") else name
    for g, role in LAYER.values():
        if rest == g:
            return role
    if rest in EXPERTS.values():
        return EXPS
    for g, role in MTP_ONLY.values():
        if rest == g:
            return role
    if rest == MTP_EH_PROJ:
        return MTP_PROJ
    raise KeyError(name)
