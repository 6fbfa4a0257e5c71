"""Routed experts in host memory under a GPU layer (kernels/offload.py, swapped into a loaded model's split blocks by
v4cli/engine/specialize.py).

No second device here: the streaming path stages into slots on the CPU, which runs the same batching, the same
layout and the same views as on CUDA (only the pinned buffers, the copy stream and its events are CUDA's own;
tests/test_gpu_kernels.py runs those where a GPU is)."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from kernels import offload
from kernels.linear import QWeight
from v4cli.engine import Engine
from quant.errors import BadInput

pytestmark = pytest.mark.usefixtures("one_thread")


def test_batches_pack_runs_of_active_experts_in_order():
    counts = [0, 3, 1, 0, 2, 5, 1, 0, 0, 4]
    got = offload.batches(counts, per_expert=100, capacity=250)  # two experts a batch
    assert got == [[(1, 3)], [(4, 6)], [(6, 7), (9, 10)]]
    assert offload.batches(counts, 100, 10_000) == [[(1, 3), (4, 7), (9, 10)]]
    assert offload.batches(counts, 100, 50) == [[(e, e + 1)] for e in (1, 2, 4, 5, 6, 9)]  # one an expert at least
    assert offload.batches([0, 0], 100, 1000) == []


def _stack(E: int, out: int, inp: int, seed: int) -> QWeight:
    g = torch.Generator().manual_seed(seed)
    return QWeight(torch.randint(0, 256, (E * out * inp * 2,), dtype=torch.uint8, generator=g),
                   Q.BF16, (E, out, inp))


@pytest.fixture
def small_slots(monkeypatch):
    """Staging slots of 3 experts' bytes (the tests' experts), so that a call takes several batches."""
    monkeypatch.setattr(offload, "_STAGING", {})
    monkeypatch.setattr(offload, "STAGE_BYTES", 3 * ((2 * 8 * 4 + 4 * 8) * 2 + 3 * offload.ALIGN))


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_streamed_experts_are_the_experts_bytes(small_slots, device):
    ws = (_stack(7, 8, 4, 0), _stack(7, 8, 4, 1), _stack(7, 4, 8, 2))
    counts = [2, 0, 1, 1, 0, 3, 1]
    seen = []
    for e, views in offload.stream_experts(counts, ws, torch.device(device)):
        seen.append(e)
        for v, w in zip(views, ws):
            ref = w.expert(e)
            assert v.shape == ref.shape and v.qtype == ref.qtype and v.device.type == device
            assert torch.equal(v.raw.cpu(), ref.raw)  # on CUDA, read on the compute stream after the upload
            at = v.raw.data_ptr() - v.raw.untyped_storage().data_ptr()  # offset in its slot
            assert v.raw.untyped_storage().data_ptr() != w.raw.untyped_storage().data_ptr()  # a copy
            assert e not in (0, 2, 5) or at % offload.ALIGN == 0  # each run starts aligned
    assert seen == [0, 2, 3, 5, 6]
    assert len(offload.batches(counts, offload._slot_bytes(ws), offload.STAGE_BYTES)) == 2


def test_choose_by_cost_and_by_override(monkeypatch):
    monkeypatch.delenv("V4_EXPERTS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)  # a workstation's cores
    # Flash-sized Q4_K experts (256 × 2048 × 4096), bytes on the meta device: shapes and sizes, no memory
    big = tuple(QWeight(torch.empty(256 * 2048 * 4096 * 144 // 256, dtype=torch.uint8, device="meta"), Q.Q4_K,
                        (256, 2048, 4096)) for _ in range(3))
    assert offload.choose(6, big) == offload.HOST  # one decode token: 6 products vs 6 experts' bytes over PCIe
    assert offload.choose(6 * 8192, big) == offload.STREAM  # an 8K chunk: every expert, a thousand products each
    monkeypatch.setenv("V4_EXPERTS", "stream")
    assert offload.choose(6, big) == offload.STREAM
    monkeypatch.setenv("V4_EXPERTS", "gpu")
    with pytest.raises(BadInput, match="V4_EXPERTS"):
        offload.choose(6, big)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a CUDA GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tiny_gguf):
    with pytest.raises(BadInput, match="no CUDA GPU") as e:
        Engine.load(tiny_gguf("q8"), device="cuda")
    assert "drop --device" in e.value.hint


@pytest.mark.parametrize("recipe", ["lossless", "q8"])
def test_streamed_grouped_experts_match_resident_ones(tiny_gguf, recipe, small_slots, monkeypatch):
    # The prefill MoE over experts staged batch by batch is the same computation as over the resident experts:
    # the same kernels on the same bytes, so equal to the last bit.
    monkeypatch.setenv("V4_EXPERTS", offload.STREAM)
    model = Engine.load(tiny_gguf(recipe), kv_format="f32").model
    g = torch.Generator().manual_seed(0)
    for blk in model.blocks:
        moe = blk.moe
        ws = (moe.w1, moe.w3, moe.w2)
        x = torch.randn(24, model.args.hidden_size, generator=g)
        idx, wts = moe.route(x, torch.randint(0, model.args.vocab_size, (24,), generator=g))
        assert len(offload.batches(torch.bincount(idx.reshape(-1), minlength=moe.E).tolist(),
                                   offload._slot_bytes(ws), offload.STAGE_BYTES)) > 1
        streamed = offload.host_experts(x, idx, wts, ws, moe.limit, on_host=None)
        assert torch.equal(streamed, moe.routed(x, idx, wts))


@pytest.mark.parametrize("how", [offload.HOST, offload.STREAM])
@pytest.mark.parametrize("kernels", ["reference", "fast"])
def test_host_expert_layers_match_resident_ones(tiny_gguf, kernels, how, monkeypatch):
    # A layer whose experts the loader left in host memory gets offload's experts op and keeps post as its parts
    # (mix → experts → finish, so that the engine can graph the two ends; never the fused one-token post): whole
    # prompts and token-by-token decode give the resident layers' logits. Here the experts are "elsewhere" on the
    # same CPU. HOST with the references runs the very same ops; STREAM runs decode's experts as grouped products
    # (summation order); with the fast kernels the resident post is the fused one-token C kernel at T = 1.
    from v4cli.engine import specialize

    monkeypatch.setenv("V4_KERNELS", kernels)
    monkeypatch.setenv("V4_EXPERTS", how)
    path, ids = tiny_gguf("q8"), list(range(5, 45))

    def run(eng):
        cache = eng.new_cache()
        with torch.no_grad():
            return torch.cat([eng.model.forward(torch.tensor(ids[:30]), cache), eng.model.forward(
                torch.tensor(ids[30:31]), cache), eng.model.forward(torch.tensor(ids[31:32]), cache)])

    resident = run(Engine.load(path, kv_format="f32"))
    monkeypatch.setattr(specialize, "experts_elsewhere", lambda blk: True)
    eng = Engine.load(path, kv_format="f32")
    for blk in eng.model.blocks:
        assert blk.split and blk.moe.routed.func is offload.host_experts and "post" not in vars(blk)
    err = ((run(eng) - resident).norm() / resident.norm()).item()
    assert err <= (0.0 if how == offload.HOST else 1e-5) if kernels == "reference" else err <= 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("how", [offload.HOST, offload.STREAM])
def test_hybrid_engine_matches_cpu(tiny_gguf, how, small_slots, monkeypatch):
    # The GPU holds the head, every layer's dense set, the KV cache and layer 0's routed experts; the other layers'
    # experts stay in host memory and run there (HOST) or are streamed over (STREAM). Chunked prefill, then decode
    # with mix / finish replayed from CUDA graphs around the experts' round trip, against the CPU engine.
    from v4cli.engine.cuda_graphs import Graphed
    from v4cli.gguf_file import GGUFFile
    from v4cli.model.kvsize import kv_bytes
    from v4cli.planning.machine import GPU_RESERVE
    from v4cli.testing.tiny import random_token_ids
    from quant import names as N

    monkeypatch.setenv("V4_EXPERTS", how)
    path = tiny_gguf("q8")
    with GGUFFile(path) as f:
        dense = sum(t.nbytes for t in f.tensors.values() if N.role_of_gguf(t.name) not in (N.EXPS, N.EMBED))
        layer0 = sum(f.tensors[N.experts(0, k)].nbytes for k in ("w1", "w2", "w3"))
        gpu_mem = GPU_RESERVE + dense + kv_bytes(f.args, "f32", 256) + layer0 + 1000  # the f32 cache loaded below
    cpu = Engine.load(path, kv_format="f32")
    hybrid = Engine.load(path, kv_format="f32", device="cuda", ctx=256, gpu_mem=gpu_mem)
    blocks = hybrid.model.blocks
    assert [b.split for b in blocks] == [False] + [True] * (len(blocks) - 1)
    assert blocks[1].device.type == "cuda" and blocks[1].moe.w1.device.type == "cpu"
    assert hybrid.model.embed.device.type == "cpu" and hybrid.device.type == "cuda"
    prompt = random_token_ids(40, seed=5)
    torch.testing.assert_close(hybrid.logits(prompt, chunk=16).cpu(), cpu.logits(prompt, chunk=16),
                               rtol=1e-3, atol=1e-3)
    steps = []
    for eng in (cpu, hybrid):
        cache = eng.new_cache()
        eng.prefill(prompt, cache, chunk=16)
        steps.append(torch.cat([eng.model.forward(torch.tensor([t], device=eng.device), cache, last_only=True)
                                for t in prompt[:6]]).cpu())
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-3, atol=1e-3)
    assert isinstance(blocks[1].mix, Graphed) and len(blocks[1].mix.graphs) == 1
