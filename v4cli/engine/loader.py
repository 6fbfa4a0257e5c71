"""Load a `deepseek4` GGUF into the torch model: tensors stay in their GGUF encoding, viewed from the mmap."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from kernels.linear import QWeight
from quant import names as N
from quant.errors import BadInput, GGUFError
from v4cli.engine.options import RUN
from v4cli.engine.specialize import specialize
from v4cli.gguf_file import GGUFModel, open_gguf
from v4cli.model.deepseek4 import MTP, DeepseekV4
from v4cli.planning.machine import GPU, Machine, detect_machine
from v4cli.planning.placement import place
from v4cli.planning.tensors import Inventory
from v4cli.units import parse_size

PLAN_CTX = 32768  # the KV cache's room in the placement plan when the caller names no context

# what an MTP draft file must share with its trunk for the draft block to read the trunk's streams
_SHARED_DIMS = ("hidden_size", "vocab_size", "hc_mult", "num_hidden_layers", "num_attention_heads", "head_dim",
                "n_routed_experts", "moe_intermediate_size")


def load_model(path: str | Path, device: str | torch.device = RUN.device, *, ctx: int | None = None,
               kv_format: str = RUN.kv_format, gpu_mem: int | None = None) -> tuple[DeepseekV4, GGUFModel]:
    """(model, open GGUF) from a GGUF file, any part of a split set, or its folder. On CPU the weights are
    zero-copy views of the file's pages, mapped in up front. On another device each tensor goes where the placement
    plan puts it for a `ctx`-token `kv_format` cache and `gpu_mem` bytes of device memory (None: what is free):
    copied to the device, or left in host memory."""
    gf = open_gguf(path)
    place = placement(gf, device, ctx=ctx, kv_format=kv_format, gpu_mem=gpu_mem)
    model = DeepseekV4(gf.args, _tensors(gf, place))
    prepare_kernels()
    specialize(model.blocks)  # after the backends load: it swaps in the fused halves they offer
    return model, gf


def prepare_kernels() -> None:
    """Load the fast kernel backends now (once per process; the CPU library's first build on this machine takes
    ~15 s), so the compile is part of loading and never lands in the first timed prefill. V4_KERNELS=reference,
    read here, keeps every op on its reference."""
    from kernels import backends

    backends.load()


def placement(gf: GGUFModel, device: str | torch.device, *, ctx: int | None = None, kv_format: str = RUN.kv_format,
              gpu_mem: int | None = None, machine: Machine | None = None) -> Callable[[str], torch.device]:
    """Tensor name → the torch device it is loaded to.

    CPU: everything. An accelerator: what the plan (v4cli/planning/placement.py) puts on the `gpu` tier (the head,
    dense layers from layer 0 up, then whole layers' routed experts while its memory lasts); the `ram` and `disk`
    tiers stay in host memory, read in place from the mmap by the CPU kernels. The machine is `detect_machine`'s,
    as for `v4 plan`, with `gpu_mem` (None: $V4_GPU_MEM, e.g. 20G to leave room for other programs) as its VRAM."""
    device = torch.device(device)
    if device.type == "cpu":
        return lambda name: device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {device}: torch sees no CUDA GPU on this machine",
                       hint="drop --device to run on the CPU, or install a CUDA build of torch")
    if machine is None:
        if gpu_mem is None and os.environ.get("V4_GPU_MEM"):
            gpu_mem = parse_size(os.environ["V4_GPU_MEM"])
        machine = detect_machine(vram=gpu_mem, measure=False)
    where = place(Inventory.from_gguf_file(gf), machine, ctx or PLAN_CTX, kv_format)
    host = torch.device("cpu")
    return lambda name: device if where.tier(name) == GPU else host


def load_mtp(model: DeepseekV4, path: str | Path) -> tuple[MTP, GGUFModel]:
    """(draft head, open GGUF) from llama.cpp's separate MTP file (`v4 quantize --mtp`) for `model`.

    The draft goes to the device of the trunk's head, its experts to host memory if any trunk layer's are there
    (then it runs them as the trunk's split layers do)."""
    gf = open_gguf(path)
    head, host = model.head.device, torch.device("cpu")
    experts_home = host if any(b.moe.w1.device == host for b in model.blocks) else head
    args = gf.validate_deepseek4()
    if args.num_nextn_predict_layers < 1 or N.mtp_eh_proj(args.num_hidden_layers) not in gf.tensors:
        raise GGUFError(f"{path}: not an MTP draft file (no blk.{args.num_hidden_layers} draft block)",
                        hint="write one with v4 quantize CHECKPOINT --mtp")
    diff = [f"{k} {getattr(args, k)} vs {getattr(model.args, k)}" for k in _SHARED_DIMS
            if getattr(args, k) != getattr(model.args, k)]
    if diff:
        raise GGUFError(f"{path}: the MTP draft is for another model ({'; '.join(diff)})",
                        hint="convert the draft from the same checkpoint as the model: v4 quantize --mtp")
    experts = {N.experts(args.num_hidden_layers, k) for k in ("w1", "w2", "w3")}
    mtp = MTP(model, _tensors(gf, lambda name: experts_home if name in experts else head))
    prepare_kernels()
    specialize([mtp.block])
    return mtp, gf


def _tensors(gf: GGUFModel, place: Callable[[str], torch.device]) -> dict[str, QWeight]:
    """Every tensor of gf as a QWeight on place(name): host ones view the mmap (no copy), its pages mapped in up
    front since they are used in place."""
    if any(place(name).type == "cpu" for name in gf.tensors):
        gf.prefault()
    tensors = {}
    for name, info in gf.tensors.items():
        w, device = QWeight(gf.raw(name), info.qtype, info.shape), place(name)
        tensors[name] = w if device.type == "cpu" else w.to(device)
    return tensors
