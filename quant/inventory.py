"""The official checkpoint's tensor inventory (name, dtype, shape), rebuilt from config.json alone.

One source of truth for what an official V4 checkpoint contains (facts §3): the converter validates real
checkpoints against it, `--dry-run` sizes the full Flash model from it, and the tiny test checkpoints are
generated from it, so all three agree by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from quant.official import BF16, E8M0, F32, FP8, I8, I64, SourceTensor

FP8_BLOCK = 128
FP4_BLOCK = 32


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return SourceTensor(self.name, self.dtype, self.shape, "").nbytes


def official_inventory(cfg: dict, with_mtp: bool = True) -> list[Entry]:
    """Every tensor of the official checkpoint for `cfg` (a config.json dict), in file order."""
    D, V = cfg["hidden_size"], cfg["vocab_size"]
    H, hd = cfg["num_attention_heads"], cfg["head_dim"]
    qr, og, olr = cfg["q_lora_rank"], cfg["o_groups"], cfg["o_lora_rank"]
    E, F, k = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["num_experts_per_tok"]
    ih, idim, hc = cfg["index_n_heads"], cfg["index_head_dim"], cfg["hc_mult"]
    mix = (2 + hc) * hc
    out: list[Entry] = []

    def add(name, dtype, *shape):
        out.append(Entry(name, dtype, tuple(shape)))

    def fp8(name, o, i):
        add(name + ".weight", FP8, o, i)
        add(name + ".scale", E8M0, math.ceil(o / FP8_BLOCK), math.ceil(i / FP8_BLOCK))

    def fp4(name, o, i):
        add(name + ".weight", I8, o, i // 2)
        add(name + ".scale", E8M0, o, i // FP4_BLOCK)

    def hc_params(prefix, n_mix, n_scale):
        add(prefix + "_fn", F32, n_mix, hc * D)
        add(prefix + "_base", F32, n_mix)
        add(prefix + "_scale", F32, n_scale)

    def compressor(prefix, dim, ratio, overlap):
        w = 2 * dim if overlap else dim
        add(prefix + ".wkv.weight", BF16, w, D)
        add(prefix + ".wgate.weight", BF16, w, D)
        add(prefix + ".ape", F32, ratio, w)
        add(prefix + ".norm.weight", BF16, dim)

    def block(p, ratio, hashed):
        add(p + "attn_norm.weight", BF16, D)
        add(p + "ffn_norm.weight", BF16, D)
        hc_params(p + "hc_attn", mix, 3)
        hc_params(p + "hc_ffn", mix, 3)
        add(p + "attn.attn_sink", F32, H)
        fp8(p + "attn.wq_a", qr, D)
        add(p + "attn.q_norm.weight", BF16, qr)
        fp8(p + "attn.wq_b", H * hd, qr)
        fp8(p + "attn.wkv", hd, D)
        add(p + "attn.kv_norm.weight", BF16, hd)
        fp8(p + "attn.wo_a", og * olr, H * hd // og)
        fp8(p + "attn.wo_b", D, og * olr)
        if ratio:
            compressor(p + "attn.compressor", hd, ratio, overlap=ratio == 4)
        if ratio == 4:
            fp8(p + "attn.indexer.wq_b", ih * idim, qr)
            add(p + "attn.indexer.weights_proj.weight", BF16, ih, D)
            compressor(p + "attn.indexer.compressor", idim, ratio, overlap=True)
        add(p + "ffn.gate.weight", BF16, E, D)
        if hashed:
            add(p + "ffn.gate.tid2eid", I64, V, k)
        else:
            add(p + "ffn.gate.bias", F32, E)
        for e in range(E):
            fp4(f"{p}ffn.experts.{e}.w1", F, D)
            fp4(f"{p}ffn.experts.{e}.w2", D, F)
            fp4(f"{p}ffn.experts.{e}.w3", F, D)
        fp8(p + "ffn.shared_experts.w1", F, D)
        fp8(p + "ffn.shared_experts.w2", D, F)
        fp8(p + "ffn.shared_experts.w3", F, D)

    add("embed.weight", BF16, V, D)
    add("head.weight", BF16, V, D)
    add("norm.weight", BF16, D)
    hc_params("hc_head", hc, 1)
    n = cfg["num_hidden_layers"]
    for layer in range(n):
        block(f"layers.{layer}.", cfg["compress_ratios"][layer], layer < cfg["num_hash_layers"])
    if with_mtp:
        for m in range(cfg.get("num_nextn_predict_layers", 0)):
            p = f"mtp.{m}."
            block(p, cfg["compress_ratios"][n + m], hashed=False)
            fp8(p + "e_proj", D, D)
            fp8(p + "h_proj", D, D)
            add(p + "enorm.weight", BF16, D)
            add(p + "hnorm.weight", BF16, D)
            add(p + "norm.weight", BF16, D)
            hc_params(p + "hc_head", hc, 1)
    return out
