"""Load a `deepseek4` GGUF into the torch model: tensors stay in their GGUF encoding, viewed from the mmap."""

from __future__ import annotations

from pathlib import Path

import torch

from kernels.linear import QWeight
from quant import names as N
from v4cli.errors import GGUFError
from v4cli.gguf_file import GGUFFile
from v4cli.model.deepseek4 import MTP, DeepseekV4

# what an MTP draft file must share with its trunk for the draft block to read the trunk's streams
_SHARED_DIMS = ("hidden_size", "vocab_size", "hc_mult", "num_hidden_layers", "num_attention_heads", "head_dim",
                "n_routed_experts", "moe_intermediate_size")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[DeepseekV4, GGUFFile]:
    """(model, open GGUFFile). On CPU the weights are zero-copy views of the file's pages, mapped in up front;
    on another device they are copied there."""
    gf = _open(path, device)
    return DeepseekV4(gf.args, _tensors(gf, device)), gf


def load_mtp(model: DeepseekV4, path: str | Path, device: str | torch.device = "cpu") -> tuple[MTP, GGUFFile]:
    """(draft head, open GGUFFile) from llama.cpp's separate MTP file (`v4 quantize --mtp`) for `model`."""
    gf = _open(path, device)
    args = gf.validate_deepseek4()
    if args.num_nextn_predict_layers < 1 or N.mtp_eh_proj(args.num_hidden_layers) not in gf.tensors:
        raise GGUFError(f"{path}: not an MTP draft file (no blk.{args.num_hidden_layers} draft block)",
                        hint="write one with v4 quantize CHECKPOINT --mtp")
    diff = [f"{k} {getattr(args, k)} vs {getattr(model.args, k)}" for k in _SHARED_DIMS
            if getattr(args, k) != getattr(model.args, k)]
    if diff:
        raise GGUFError(f"{path}: the MTP draft is for another model ({'; '.join(diff)})",
                        hint="convert the draft from the same checkpoint as the model: v4 quantize --mtp")
    return MTP(model, _tensors(gf, device)), gf


def _open(path: str | Path, device: str | torch.device) -> GGUFFile:
    """The GGUF, its pages mapped in up front when the weights will be used in place (CPU)."""
    gf = GGUFFile(path)
    if torch.device(device).type == "cpu":
        gf.prefault()
    return gf


def _tensors(gf: GGUFFile, device: str | torch.device) -> dict[str, QWeight]:
    device = torch.device(device)
    tensors = {}
    for name, info in gf.tensors.items():
        w = QWeight(gf.raw(name), info.qtype, info.shape)
        tensors[name] = w if device.type == "cpu" else w.to(device)
    return tensors
