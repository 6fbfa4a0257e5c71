"""Load a `deepseek4` GGUF into the torch model: tensors stay in their GGUF encoding, viewed from the mmap."""

from __future__ import annotations

from pathlib import Path

import torch

from kernels.linear import QWeight
from v4cli.gguf_file import GGUFFile
from v4cli.model.deepseek4 import DeepseekV4


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[DeepseekV4, GGUFFile]:
    """(model, open GGUFFile). On CPU the weights are zero-copy views; on another device they are copied there."""
    gf = GGUFFile(path)
    args = gf.args
    device = torch.device(device)
    tensors = {}
    for name, info in gf.tensors.items():
        w = QWeight(gf.raw(name), info.qtype, info.shape)
        tensors[name] = w if device.type == "cpu" else w.to(device)
    return DeepseekV4(args, tensors), gf
