"""Golden logits from transformers' DeepseekV4ForCausalLM (the independent oracle), loaded with the exactly
dequantized official weights through transformers' own official→transformers name mapping."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as gguf_types
from safetensors.torch import save_file

from quant import names
from quant.official import Checkpoint, dequantized


def _transformers_config(cfg: dict) -> dict:
    """config.json → the explicit transformers form (any HCA ratio, not just the legacy 0/4/128 list)."""
    n = cfg["num_hidden_layers"]
    ratios = cfg["compress_ratios"][:n]
    hca = sorted({r for r in ratios if r not in (0, 4)}) or [128]
    if len(hca) > 1:
        raise ValueError(f"transformers takes one HCA ratio, config has {hca}")
    types = {0: "sliding_attention", 4: "compressed_sparse_attention"}
    out = {k: v for k, v in cfg.items() if k not in ("quantization_config", "compress_ratios", "rope_scaling",
                                                      "num_hash_layers", "expert_dtype", "qk_rope_head_dim")}
    rs = cfg.get("rope_scaling") or {}
    out.update(
        layer_types=[types.get(r, "heavily_compressed_attention") for r in ratios],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": hca[0]},
        mlp_layer_types=["hash_moe" if i < cfg["num_hash_layers"] else "moe" for i in range(n)],
        partial_rotary_factor=cfg["qk_rope_head_dim"] / cfg["head_dim"],
        rope_parameters={"rope_type": rs.get("type", "yarn"), "factor": rs["factor"],
                         "original_max_position_embeddings": rs["original_max_position_embeddings"],
                         "beta_fast": rs["beta_fast"], "beta_slow": rs["beta_slow"]},
        torch_dtype="float32",
    )
    return out


def load_reference_model(ckpt_dir: Path):
    """transformers' model in fp32 with the checkpoint's exact weights (MTP tensors are not part of it)."""
    ckpt = Checkpoint(ckpt_dir)
    cfg = json.loads((Path(ckpt_dir) / "config.json").read_text())
    weights = {
        n: dequantized(ckpt, n).contiguous()
        for n in ckpt.tensors
        if not n.endswith(".scale") and not n.startswith("mtp.")
    }
    return _transformers_model(cfg, weights)


def gguf_weights(path: Path) -> dict[str, torch.Tensor]:
    """A deepseek4 GGUF's trunk tensors under their official names, dequantized by gguf-py's own reader and numpy
    dequantizers (independent of our reader and kernels): what the file's weights are, whoever wrote it."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    official = {names.to_gguf(o).gguf: o for o in names.ROOT}
    w_of = {g: w for w, g in names.EXPERTS.items()}
    out = {}
    for t in GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml order → torch order
        if t.tensor_type == gguf_types.I32:
            out_t = torch.from_numpy(np.asarray(t.data).astype(np.int64).reshape(shape))
        else:
            out_t = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
                                     .reshape(shape))
        name = t.name
        if name in official:
            out[official[name]] = out_t
            continue
        _, layer, rest = name.split(".", 2)
        if rest in w_of:
            for e in range(shape[0]):
                out[names.official_expert(int(layer), e, w_of[rest])] = out_t[e].clone()
            continue
        suffix = next(o for o, (g, _) in names.LAYER.items() if g == rest)
        out[names.official_layer(int(layer), suffix)] = out_t
    return out


def load_reference_model_from_gguf(path: Path, cfg: dict):
    """transformers' model in fp32 with a GGUF file's own (dequantized) weights; `cfg` is the source config.json."""
    return _transformers_model(cfg, gguf_weights(path))


def _transformers_model(cfg: dict, weights: dict[str, torch.Tensor]):
    from transformers import DeepseekV4ForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        save_file(weights, str(Path(tmp) / "model.safetensors"))
        (Path(tmp) / "config.json").write_text(json.dumps(_transformers_config(cfg)))
        model = DeepseekV4ForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def golden_logits(ckpt_dir: Path, token_ids: list[int], model=None) -> torch.Tensor:
    """f32 logits [T, vocab] for one sequence, no cache."""
    model = model or load_reference_model(ckpt_dir)
    ids = torch.tensor([token_ids], dtype=torch.long)
    return model(input_ids=ids, use_cache=False).logits[0].float()
