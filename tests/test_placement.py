"""The placement plan on the real Flash inventory (from config alone) and a tiny GGUF, without a GPU."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from quant import keys as K
from quant import names as N
from quant.config import FLASH_CONFIG, ModelArgs
from v4cli.model import kvsize
from v4cli.engine.loader import _tensors, placement
from quant.errors import DoesNotFit
from v4cli.gguf_file import GGUFFile, deepseek4_tensor_shapes
from v4cli.placement import (
    CPU,
    CPU_RESERVE,
    GPU,
    GPU_RESERVE,
    MMAP,
    PlacementPlan,
    flash_gguf_inventory,
    inventory_for,
)

G = 10**9
FLASH = ModelArgs.from_config(FLASH_CONFIG)
DENSE = {"head", "attention", "compressor", "indexer", "norms", "mhc", "router", "shared_experts"}


@pytest.fixture(scope="module")
def inv():
    return flash_gguf_inventory()


def test_flash_inventory_sizes(inv):
    assert len(inv) == 1328
    total = sum(i.nbytes for i in inv)
    assert 154e9 < total < 157e9  # facts §6: the converter's Q8_0 + MXFP4 file is ≈156 GB
    exps = [i for i in inv if N.role_of_gguf(i.name) == N.EXPS]
    assert {i.qtype for i in exps} == {Q.MXFP4} and exps[0].nbytes == 256 * 2048 * 4096 * 17 // 32
    assert all(i.qtype == Q.F32 for i in inv if len(i.shape) == 1)
    assert {i.qtype for i in inv if N.role_of_gguf(i.name) == N.TID2EID} == {Q.I32}
    q2 = flash_gguf_inventory({N.EXPS: Q.Q2_K})
    expert_elems = 43 * 3 * 256 * 2048 * 4096
    assert sum(i.nbytes for i in exps) == expert_elems * 17 // 32  # MXFP4: 17 bytes per 32
    assert total - sum(i.nbytes for i in q2) == expert_elems * 17 // 32 - expert_elems * 84 // 256  # Q2_K: 84 per 256


def test_cpu_only(inv):
    p = PlacementPlan.build(inv, FLASH, ctx=32768, kv_format="bf16", gpu_mem=0, cpu_mem=256 * G)
    assert {t.device for t in p.tensors.values()} == {CPU} and p.kv_device == CPU
    assert p.totals() == {GPU: 0, CPU: sum(i.nbytes for i in inv) + kvsize.kv_bytes(FLASH, "bf16", 32768), MMAP: 0}
    assert p.notes == ["no GPU: everything runs on the CPU"] and p.fits


def test_fake_24gb_gpu_with_128gb_ram(inv):
    p = PlacementPlan.build(inv, FLASH, ctx=1 << 20, kv_format="fp8", gpu_mem=24 * G, cpu_mem=128 * G)
    by = {}
    for t in p.tensors.values():
        by.setdefault(t.component, set()).add(t.device)
    assert all(by[c] == {GPU} for c in DENSE)  # the whole dense set and the head
    assert by["embedding"] == {CPU}  # only rows are gathered
    assert p.kv_device == GPU
    # routed experts, contiguous by layer: on the GPU while what is left of it lasts, then resident in RAM, then
    # paged from disk
    exp_dev = [p.where(N.experts(L, "w1")).device for L in range(43)]
    g, k = exp_dev.index(CPU), exp_dev.index(MMAP)
    assert exp_dev == [GPU] * g + [CPU] * (k - g) + [MMAP] * (43 - k) and 1 <= g < 8 and 20 < k < 43
    bigger = PlacementPlan.build(inv, FLASH, ctx=1 << 20, kv_format="fp8", gpu_mem=80 * G, cpu_mem=128 * G)
    assert [bigger.where(N.experts(L, "w1")).device for L in range(43)].index(CPU) > g
    tot = p.totals()
    assert tot[GPU] <= 24 * G - GPU_RESERVE and tot[CPU] <= 128 * G - CPU_RESERVE
    assert sum(tot.values()) == sum(i.nbytes for i in inv) + p.kv_nbytes
    assert p.notes == [(f"routed experts of layers {k}–42 do not fit the CPU memory budget: decode will page them "
                        "from disk (expect a slow first pass and disk-bound decode)")]
    rows = p.summary()
    assert [r.component for r in rows][:2] == ["head", "attention"] and rows[-1].component == "kv_cache"
    assert sum(r.nbytes for r in rows) == sum(tot.values())
    assert [(r.where, r.form) for r in rows if r.component == "routed_experts"] == [
        (GPU, "stored"), (CPU, "stored"), (MMAP, "stored")]


def test_tiny_gpu_gets_a_prefix_of_layers(inv):
    p = PlacementPlan.build(inv, FLASH, ctx=4096, kv_format="bf16", gpu_mem=GPU_RESERVE + 2 * G, cpu_mem=512 * G)
    on_gpu = sorted({t.layer for t in p.tensors.values() if t.device == GPU and t.layer is not None})
    assert on_gpu == list(range(len(on_gpu))) and 0 < len(on_gpu) < 43  # contiguous from layer 0
    assert p.where(N.root("head.weight")).device == GPU
    assert p.kv_device == CPU  # not every layer's attention is on the GPU
    assert p.totals()[GPU] <= 2 * G and p.notes == [f"only {len(on_gpu)} of 43 layers' dense weights fit the GPU budget"]
    none = PlacementPlan.build(inv, FLASH, ctx=4096, kv_format="bf16", gpu_mem=GPU_RESERVE + 10**6, cpu_mem=512 * G)
    assert none.totals()[GPU] == 0


def test_kv_goes_to_the_gpu_only_when_it_fits(inv):
    def kv_dev(gpu, fmt):
        return PlacementPlan.build(inv, FLASH, ctx=1 << 20, kv_format=fmt, gpu_mem=gpu, cpu_mem=512 * G).kv_device

    # dense ≈ 7.3 GB: a 12 GB card has ≈ 2.7 GB left after the reserve — not 7.2 GB of bf16, not 3.7 GB of fp8
    assert (kv_dev(12 * G, "bf16"), kv_dev(12 * G, "fp8")) == (CPU, CPU)
    assert (kv_dev(14 * G, "bf16"), kv_dev(14 * G, "fp8")) == (CPU, GPU)
    assert (kv_dev(24 * G, "bf16"), kv_dev(24 * G, "fp8")) == (GPU, GPU)


def test_dequantized_gpu_form(inv):
    p = PlacementPlan.build(inv, FLASH, ctx=4096, kv_format="bf16", gpu_mem=80 * G, cpu_mem=512 * G,
                            dequant_gpu=True)
    q_b = p.where(N.blk(0, "attn.wq_b.weight"))
    assert (q_b.device, q_b.form, q_b.nbytes) == (GPU, "bf16", 32768 * 1024 * 2)
    norm = p.where(N.blk(0, "attn_norm.weight"))
    assert (norm.form, norm.nbytes) == ("stored", 4096 * 4)  # already plain F32
    e0, e42 = p.where(N.experts(0, "w1")), p.where(N.experts(42, "w1"))
    assert (e0.device, e0.form, e42.device, e42.form) == (GPU, "bf16", CPU, "stored")  # bf16 only on the GPU


def test_deterministic_and_kv_that_fits_nowhere(inv):
    a = PlacementPlan.build(inv, FLASH, ctx=65536, kv_format="fp8", gpu_mem=16 * G, cpu_mem=64 * G)
    b = PlacementPlan.build(list(inv), FLASH, ctx=65536, kv_format="fp8", gpu_mem=16 * G, cpu_mem=64 * G)
    assert a == b and a.summary() == b.summary()
    bad = PlacementPlan.build(inv, FLASH, ctx=1 << 20, kv_format="bf16", gpu_mem=0, cpu_mem=CPU_RESERVE + 10**9)
    assert not bad.fits
    with pytest.raises(DoesNotFit, match="KV cache for 1,048,576 tokens"):
        bad.check()


def test_plan_from_a_gguf_file(tmp_path):
    cfg = copy.deepcopy(FLASH_CONFIG)
    cfg.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=32, qk_rope_head_dim=8,
               q_lora_rank=32, o_groups=2, o_lora_rank=32, moe_intermediate_size=32, n_routed_experts=2,
               num_experts_per_tok=1, num_hash_layers=1, index_n_heads=2, index_head_dim=32, vocab_size=16,
               compress_ratios=[4, 8, 0])
    args = ModelArgs.from_config(cfg)
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), K.ARCH)
    for key, value, vtype in args.gguf_kv():
        w.add_key_value(key, value, vtype)
    for name, shape in deepseek4_tensor_shapes(args).items():
        w.add_tensor(name, np.zeros(shape, np.int32 if "tid2eid" in name else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(tmp_path / "t.gguf") as f:
        # room for the dense set, the KV cache and layer 0's routed experts, not layer 1's
        experts = {L: sum(f.tensors[N.experts(L, k)].nbytes for k in ("w1", "w2", "w3")) for L in (0, 1)}
        dense = sum(t.nbytes for t in f.tensors.values() if N.role_of_gguf(t.name) not in (N.EXPS, N.EMBED))
        gpu = GPU_RESERVE + dense + kvsize.kv_bytes(f.args, "bf16", 256) + experts[0] + experts[1] // 2
        p = PlacementPlan.for_gguf(f, ctx=256, kv_format="bf16", gpu_mem=gpu, cpu_mem=CPU_RESERVE + 10**7)
        same = PlacementPlan.build(inventory_for(f.args, {"default": Q.F32}), f.args, ctx=256, kv_format="bf16",
                                   gpu_mem=gpu, cpu_mem=CPU_RESERVE + 10**7)
        assert set(p.tensors) == set(same.tensors) and p.totals() == same.totals()
        assert p.where(N.blk(1, "attn.wq_a.weight")).device == GPU and p.kv_device == GPU
        assert (p.where(N.experts(0, "w2")).device, p.where(N.experts(1, "w2")).device) == (GPU, CPU)

        # the engine's loader realizes the plan ("meta" stands in for the GPU): GPU tensors are copied there,
        # the rest stay zero-copy views of the file
        place = placement(f, "meta", ctx=256, kv_format="bf16", gpu_mem=gpu)
        ws = _tensors(f, place)
        for name, w in ws.items():
            want = "meta" if p.where(name).device == GPU else "cpu"
            assert w.device.type == want, name
            if want == "cpu":
                assert w.raw.untyped_storage().data_ptr() == f.raw(name).untyped_storage().data_ptr(), name
        assert ws[N.root("embed.weight")].device.type == "cpu"
