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
from quant.errors import DoesNotFit
from v4cli.engine.loader import _tensors, placement
from v4cli.gguf_file import GGUFFile, deepseek4_tensor_shapes
from v4cli.model import kvsize
from v4cli.planning.machine import DISK, GPU, GPU_RESERVE, OS_RESERVE, RAM, Machine
from v4cli.planning.placement import place
from v4cli.planning.plan import plan_at, plan_model
from v4cli.planning.tensors import Inventory

G = 10**9
FLASH = ModelArgs.from_config(FLASH_CONFIG)
DENSE = {"head", "attention", "compressor", "indexer", "norms", "mhc", "router", "shared_experts"}


@pytest.fixture(scope="module")
def inv():
    """Flash as the default recipe (q8) writes it, from config alone."""
    return Inventory.from_recipe(FLASH_CONFIG, "q8")


def test_flash_inventory_sizes(inv):
    assert len(inv.tensors) == 1328
    total = inv.nbytes
    assert 154e9 < total < 157e9  # facts §6: the converter's Q8_0 + MXFP4 file is ≈156 GB
    exps = [t for t in inv.tensors if t.role == N.EXPS]
    assert {t.qtype for t in exps} == {Q.MXFP4} and exps[0].nbytes == 256 * 2048 * 4096 * 17 // 32
    assert all(t.qtype == Q.F32 for t in inv.tensors if len(t.shape) == 1)
    assert {t.qtype for t in inv.tensors if t.role == N.TID2EID} == {Q.I32}
    expert_elems = 43 * 3 * 256 * 2048 * 4096
    assert sum(t.nbytes for t in exps) == expert_elems * 17 // 32  # MXFP4: 17 bytes per 32
    q2 = Inventory.from_recipe(FLASH_CONFIG, "q2k")
    assert sum(t.nbytes for t in q2.tensors if t.role == N.EXPS) == expert_elems * 84 // 256  # Q2_K: 84 per 256


def test_cpu_only(inv):
    p = place(inv, Machine(ram=256 * G), 32768, "bf16")
    assert {w.tier for w in p.tensors.values()} == {RAM} and p.kv_tier == RAM
    assert p.totals() == {GPU: 0, RAM: inv.nbytes + kvsize.kv_bytes(FLASH, "bf16", 32768), DISK: 0}
    assert p.notes == () and p.fits


def test_fake_24gb_gpu_with_128gb_ram(inv):
    m = Machine(ram=128 * G, vram=24 * G)
    p = place(inv, m, 1 << 20, "fp8")
    by = {}
    for t in inv.tensors:
        by.setdefault(t.component, set()).add(p.tier(t.name))
    assert all(by[c] == {GPU} for c in DENSE)  # the whole dense set and the head
    assert by["embedding"] == {RAM}  # only rows are gathered
    assert p.kv_tier == GPU
    # routed experts, contiguous by layer: on the GPU while what is left of it lasts, then resident in RAM, then
    # paged from disk
    exp_tier = [p.tier(N.experts(L, "w1")) for L in range(43)]
    g, k = exp_tier.index(RAM), exp_tier.index(DISK)
    assert exp_tier == [GPU] * g + [RAM] * (k - g) + [DISK] * (43 - k) and 1 <= g < 8 and 20 < k < 43
    bigger = place(inv, Machine(ram=128 * G, vram=80 * G), 1 << 20, "fp8")
    assert [bigger.tier(N.experts(L, "w1")) for L in range(43)].index(RAM) > g
    tot = p.totals()
    assert tot[GPU] <= 24 * G - GPU_RESERVE and tot[RAM] <= 128 * G - OS_RESERVE
    assert sum(tot.values()) == inv.nbytes + p.kv_nbytes
    assert p.notes == ()  # every layer's dense set is on the GPU; the plan's notes say what paging costs
    rows = plan_at(inv, m, 1 << 20, "fp8").rows()
    assert [r.component for r in rows][:2] == ["output head", "attention"]
    assert [r.component for r in rows][-3:] == ["KV cache (fp8, 1M tokens)", "CUDA + compute buffers (reserve)",
                                                "OS + runtime (reserve)"]
    assert sum(r.nbytes for r in rows) == sum(tot.values()) + GPU_RESERVE + OS_RESERVE
    assert [r.where for r in rows if r.component.startswith("routed experts")] == [GPU, RAM, DISK]


def test_tiny_gpu_gets_a_prefix_of_layers(inv):
    p = place(inv, Machine(ram=512 * G, vram=GPU_RESERVE + 2 * G), 4096, "bf16")
    on_gpu = sorted({t.layer for t in inv.tensors if p.tier(t.name) == GPU and t.layer is not None})
    assert on_gpu == list(range(len(on_gpu))) and 0 < len(on_gpu) < 43  # contiguous from layer 0
    assert p.tier(N.root("head.weight")) == GPU
    assert p.kv_tier == RAM  # not every layer's attention is on the GPU
    assert p.totals()[GPU] <= 2 * G and p.notes == (f"only {len(on_gpu)} of 43 layers' dense weights fit the GPU",)
    none = place(inv, Machine(ram=512 * G, vram=GPU_RESERVE + 10**6), 4096, "bf16")
    assert none.totals()[GPU] == 0


def test_kv_goes_to_the_gpu_only_when_it_fits(inv):
    def kv_tier(gpu, fmt):
        return place(inv, Machine(ram=512 * G, vram=gpu), 1 << 20, fmt).kv_tier

    # dense ≈ 7.8 GB: a 12 GB card has ≈ 2 GB left after the reserve — not 7.2 GB of bf16, not 3.7 GB of fp8
    assert (kv_tier(12 * G, "bf16"), kv_tier(12 * G, "fp8")) == (RAM, RAM)
    assert (kv_tier(14 * G, "bf16"), kv_tier(14 * G, "fp8")) == (RAM, GPU)
    assert (kv_tier(24 * G, "bf16"), kv_tier(24 * G, "fp8")) == (GPU, GPU)


def test_dequantized_gpu_form(inv):
    p = place(inv, Machine(ram=512 * G, vram=80 * G), 4096, "bf16", dequant_gpu=True)
    q_b = p.tensors[N.blk(0, "attn.wq_b.weight")]
    assert (q_b.tier, q_b.form, q_b.nbytes) == (GPU, "bf16", 32768 * 1024 * 2)
    norm = p.tensors[N.blk(0, "attn_norm.weight")]
    assert (norm.form, norm.nbytes) == ("stored", 4096 * 4)  # already plain F32
    e0, e42 = p.tensors[N.experts(0, "w1")], p.tensors[N.experts(42, "w1")]
    assert (e0.tier, e0.form, e42.tier, e42.form) == (GPU, "bf16", RAM, "stored")  # bf16 only on the GPU


def test_deterministic_and_kv_that_fits_nowhere(inv):
    m = Machine(ram=64 * G, vram=16 * G)
    a = place(inv, m, 65536, "fp8")
    b = place(Inventory(inv.args, tuple(inv.tensors), inv.label), m, 65536, "fp8")
    assert a == b and a.totals() == b.totals()
    small = Machine(ram=OS_RESERVE + 10**9)
    bad = place(inv, small, 1 << 20, "bf16")
    assert not bad.fits and "KV cache for 1,048,576 tokens" in bad.problems[0]
    assert not plan_at(inv, small, 1 << 20, "bf16").runs
    with pytest.raises(DoesNotFit, match="at 1M tokens does not fit"):
        plan_model(inv, small, 1 << 20, "bf16")


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
        inv = Inventory.from_gguf_file(f)
        assert {t.name for t in inv.tensors} == set(deepseek4_tensor_shapes(args))
        # room for the dense set, the KV cache and layer 0's routed experts, not layer 1's
        experts = {L: sum(f.tensors[N.experts(L, k)].nbytes for k in ("w1", "w2", "w3")) for L in (0, 1)}
        dense = sum(t.nbytes for t in f.tensors.values() if N.role_of_gguf(t.name) not in (N.EXPS, N.EMBED))
        gpu = GPU_RESERVE + dense + kvsize.kv_bytes(f.args, "bf16", 256) + experts[0] + experts[1] // 2
        m = Machine(ram=OS_RESERVE + 10**7, vram=gpu)
        p = place(inv, m, 256, "bf16")
        assert p.tier(N.blk(1, "attn.wq_a.weight")) == GPU and p.kv_tier == GPU
        assert (p.tier(N.experts(0, "w2")), p.tier(N.experts(1, "w2"))) == (GPU, RAM)

        # the engine's loader realizes the plan ("meta" stands in for the GPU): GPU tensors are copied there,
        # the rest stay zero-copy views of the file; its own machine (this RAM, `gpu_mem` as the GPU) agrees
        for place_fn in (placement(f, "meta", ctx=256, kv_format="bf16", machine=m),
                         placement(f, "meta", ctx=256, kv_format="bf16", gpu_mem=gpu)):
            assert {n: place_fn(n).type for n in f.tensors} == {
                n: "meta" if plan_at(inv, m, 256, "bf16").where[n] == GPU else "cpu" for n in f.tensors}
        ws = _tensors(f, placement(f, "meta", ctx=256, kv_format="bf16", machine=m))
        for name, w in ws.items():
            want = "meta" if p.tier(name) == GPU else "cpu"
            assert w.device.type == want, name
            if want == "cpu":
                assert w.raw.untyped_storage().data_ptr() == f.raw(name).untyped_storage().data_ptr(), name
        assert ws[N.root("embed.weight")].device.type == "cpu"
