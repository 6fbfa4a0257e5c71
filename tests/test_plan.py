"""The 128 GB planner: recipe choice, placement, KV format, context and the decode bound, on the real Flash
inventory (from config alone), small machines, a tiny GGUF file, and the `v4 plan` command's output."""

from __future__ import annotations

import functools

import pytest

from quant import names as N
from quant.config import FLASH_CONFIG, ModelArgs
from quant.recipes import FIT_ORDER
from quant.errors import BadInput, DoesNotFit
from v4cli.cli import main
from v4cli.gguf_file import GGUFFile
from v4cli.model.kvsize import kv_bytes
from v4cli.planning import machine as machine_mod
from v4cli.planning.fit import choose_recipe
from v4cli.planning.machine import DISK, GPU, GPU_RESERVE, OS_RESERVE, RAM, Machine, detect_machine, measure_bandwidth
from v4cli.planning.plan import KV, check_fits, format_ctx, plan_at, plan_model, plan_source, round_ctx_down
from v4cli.planning.tensors import Inventory
from v4cli.units import parse_ctx

G = 10**9
M1 = 1 << 20
FLASH = ModelArgs.from_config(FLASH_CONFIG)


def machine(ram_gb: float, vram_gb: float = 0, **kw) -> Machine:
    """A described machine: dual-channel DDR5 desktop RAM, a 24 GB-class GPU, an NVMe disk."""
    return Machine(int(ram_gb * G), int(vram_gb * G), ram_bw=90e9, vram_bw=900e9, disk_bw=3e9, disk_free=10**13, **kw)


@functools.cache
def flash_plan(ram_gb: float, vram_gb: float = 0, ctx: int | None = M1):
    """plan_source on the real Flash config, once per machine and context (each one searches placements)."""
    return plan_source(FLASH_CONFIG, machine(ram_gb, vram_gb), ctx, source="flash")


def dense(p, w) -> bool:
    """Tensors every decoded token reads in full (not routed experts, embedding rows, hash tables)."""
    return w.role not in (N.EXPS, N.EMBED, N.TID2EID)


# ---------------------------------------------------------------------------------------------- contexts


@pytest.mark.parametrize("text,n", [("1M", 1_048_576), ("384K", 393_216), ("65536", 65_536), ("65,536", 65_536),
                                    ("128k", 131_072), ("1.5M", 1_572_864), (" 4K ", 4096), (2048, 2048)])
def test_parse_ctx(text, n):
    assert parse_ctx(text) == n


@pytest.mark.parametrize("text", ["", "1G", "abc", "0", "-5", "1.5", "1e6", "1MB"])
def test_parse_ctx_rejects(text):
    with pytest.raises(BadInput):
        parse_ctx(text)


def test_format_and_round_ctx():
    assert [format_ctx(n) for n in (1_048_576, 393_216, 65_536, 1000, 3 * M1)] == ["1M", "384K", "64K", "1,000", "3M"]
    assert round_ctx_down(300_123) == 288 * 1024  # 8 steps per octave: 256K, 288K, 320K ...
    assert round_ctx_down(1_048_576) == 1_048_576
    assert (round_ctx_down(5000), round_ctx_down(1500), round_ctx_down(700)) == (4096, 1024, 700)
    for n in (9999, 123_456, 777_777, 1_048_575):
        r = round_ctx_down(n)
        assert r <= n and r >= n * 0.87


# ---------------------------------------------------------------------------------------------- the machine


def test_detect_machine_takes_given_values_and_measures_the_rest():
    m = detect_machine(ram=64 * G, vram=0, ram_bw=50e9, disk_bw=2e9, disk_free=5 * G)
    assert (m.ram, m.vram, m.ram_bw, m.disk_bw, m.disk_free) == (64 * G, 0, 50e9, 2e9, 5 * G)
    assert m.source["ram"] == m.source["ram_bw"] == "given" and m.source["vram_bw"] == "assumed"
    m = detect_machine(measure=False, disk_free=0)
    assert m.ram > 0 and m.source["ram"] == "detected" and m.source["ram_bw"] == "assumed"


def test_ram_bandwidth_is_measured():
    bw = measure_bandwidth("cpu", 64 << 20, repeats=2)
    assert 0.5 < bw["bound_gbs"] < 2000 and bw["bound_gbs"] == max(bw["read_gbs"], bw["copy_gbs"], bw["triad_gbs"])


# ---------------------------------------------------------------------------------------------- real Flash


def test_flash_128g_cpu_only_1m():
    m = machine(128)
    p = flash_plan(128)
    # q3k (127 GB) cannot sit beside 1M of KV and the OS in 128 GB; the imatrix-guided iq3-108 mix can, and the
    # command the plan gives says how to get the importance matrix it needs
    assert p.inventory.recipe == "iq3-108"
    assert any("--imatrix" in n and "v4 imatrix" in n for n in p.notes)
    assert set(p.where.values()) == {RAM} and p.paged == 0 and p.runs
    assert p.ctx == 1_048_576 and p.kv_format == "fp8" and p.kv_bytes == kv_bytes(FLASH, "fp8", 1_048_576)
    assert p.used(RAM) == p.inventory.nbytes + p.kv_bytes
    assert p.used(RAM) + OS_RESERVE <= m.ram  # the OS keeps its 8 GB
    # the bound: everything comes from RAM at 90 GB/s; 6 of 256 experts per layer, the rest read in full
    weights_read = sum(w.read for w in p.inventory.tensors)
    exps = sum(w.nbytes for w in p.inventory.tensors if w.role == N.EXPS)
    assert sum(w.read for w in p.inventory.tensors if w.role == N.EXPS) == pytest.approx(exps * 6 / 256, rel=1e-6)
    assert p.tokens_per_second == pytest.approx(90e9 / (weights_read + p.kv_read))
    assert 5 < p.tokens_per_second < 12  # facts §8: ≈10 tok/s for a ~9 GB/token model at 90 GB/s


def test_flash_128g_plus_24g_gpu_1m():
    m = machine(128, 24)
    p = flash_plan(128, 24)
    assert p.inventory.recipe == "q3k"  # the GPU holds the dense set and KV, so a bigger recipe fits
    assert p.paged == 0 and p.runs and p.ctx == 1_048_576
    assert p.used(GPU) <= m.vram - GPU_RESERVE and p.used(RAM) + OS_RESERVE <= m.ram
    # every tensor a token reads in full lives on the GPU, and so does the KV cache; the GPU's remaining room
    # holds the first layers' routed experts, the rest stream from RAM
    assert all(p.where[w.name] == GPU for w in p.inventory.tensors if dense(p, w))
    assert p.where[KV] == GPU
    exps = [w for w in p.inventory.tensors if w.role == N.EXPS]
    on_gpu = {w.layer for w in exps if p.where[w.name] == GPU}
    assert on_gpu == set(range(len(on_gpu))) and 1 <= len(on_gpu) < 8
    assert all(p.where[w.name] == RAM for w in p.inventory.tensors
               if w.role == N.EMBED or w.role == N.EXPS and w.layer not in on_gpu)
    assert p.read(RAM) == sum(w.read for w in p.inventory.tensors if p.where[w.name] == RAM)
    assert 15 < p.tokens_per_second < 40  # facts §8: ≈22–36 tok/s with experts streamed from RAM


def test_choose_recipe_for_quantize_fit():
    c = choose_recipe(FLASH_CONFIG, "128G", 1_048_576)
    assert c.recipe == "q2k-q3k" and c.file_bytes + c.kv_bytes + OS_RESERVE <= 128 * G
    assert c.with_imatrix == "iq3-108"  # named, with how to make the importance matrix it needs
    assert choose_recipe(FLASH_CONFIG, "128G", 1_048_576, imatrix=True).recipe == "iq3-108"
    assert choose_recipe(FLASH_CONFIG, "96G", 1_048_576, imatrix=True).recipe == "iq2-80"
    assert list(c.sizes) == list(FIT_ORDER)
    assert choose_recipe(FLASH_CONFIG, "128G", 1_048_576, vram="24G").recipe == "q3k"
    assert choose_recipe(FLASH_CONFIG, "200G", 1_048_576).recipe == "lossless"
    with pytest.raises(DoesNotFit) as e:
        choose_recipe(FLASH_CONFIG, "110G", 1_048_576)
    assert "--ctx " in e.value.hint  # q2k fits 110 GB at a shorter context
    ctx = parse_ctx(e.value.hint.split("--ctx ")[1].split()[0])
    assert 0 < ctx < M1 and choose_recipe(FLASH_CONFIG, "110G", ctx).recipe == "q2k"
    with pytest.raises(DoesNotFit) as e:
        choose_recipe(FLASH_CONFIG, "100G", 1024)  # q2k's 99 GB + the OS's 8 GB: no context helps
    assert "--ctx" not in e.value.hint


# ---------------------------------------------------------------------------------------------- small machines


def test_64g_pages_experts_from_disk_at_1m():
    m = machine(64)
    p = flash_plan(64)
    assert p.inventory.recipe == "iq2-80" and p.runs and p.paged > 0
    assert all(p.where[w.name] != DISK for w in p.inventory.tensors if dense(p, w)) and p.where[KV] == RAM
    assert {w.role for w in p.inventory.tensors if p.where[w.name] == DISK} <= {N.EXPS, N.EMBED, N.TID2EID}
    assert p.max_ctx_in_memory is None  # iq2-80 (81 GB) never fits 64 GB
    disk_ms = 1e3 * p.read(DISK) / 3e9
    assert disk_ms > 0.5 * 1e3 * p.seconds_per_token  # most of each token's time is spent waiting on the disk
    assert any(n.startswith("Experts page from disk: ") and f"{disk_ms:.0f} ms of the" in n for n in p.notes)
    # paging is slow but runs: the pre-load check returns the same plan rather than refusing
    assert check_fits(p.inventory, ctx="1M", machine=m).paged == p.paged


def test_32g_pages_most_experts_and_16g_refuses_with_a_context_that_fits():
    p32, p64 = flash_plan(32), flash_plan(64)
    assert p32.inventory.recipe == "iq2-80" and p32.runs and p32.paged > p64.paged
    assert p32.tokens_per_second < p64.tokens_per_second
    m16 = machine(16)
    with pytest.raises(DoesNotFit) as e:
        plan_source(FLASH_CONFIG, m16, parse_ctx("1M"), source="flash")
    assert "at 1M tokens does not fit 16.0 GB RAM" in str(e.value)
    assert e.value.hint.startswith("would fit: --ctx ")
    ctx = parse_ctx(e.value.hint.removeprefix("would fit: --ctx ").split()[0])
    assert 0 < ctx < M1 and plan_source(FLASH_CONFIG, m16, ctx, source="flash").runs
    # without --ctx the planner picks the largest context that runs
    p = flash_plan(16, ctx=None)
    assert p.ctx_chosen and ctx <= p.ctx < M1 and p.ctx == p.max_ctx
    assert p.ctx % 1024 == 0 and not plan_at(p.inventory, m16, p.ctx + 1024, p.kv_format).runs


def test_kv_format_auto_prefers_exact_bf16_when_it_is_nearly_free():
    inv = Inventory.from_recipe(FLASH_CONFIG, "q2k", "flash")
    short = plan_model(inv, machine(128), parse_ctx("16K"))
    assert short.kv_format == "bf16"
    long = plan_model(inv, machine(128), parse_ctx("1M"))
    assert long.kv_format == "fp8"  # bf16 KV at 1M reads twice the bytes per token
    assert plan_model(inv, machine(128), parse_ctx("1M"), kv_format="bf16").kv_format == "bf16"
    with pytest.raises(BadInput):
        plan_model(inv, machine(128), parse_ctx("2M"))


# ---------------------------------------------------------------------------------------------- GGUF input


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    """(path, inventory) of the tiny lossless GGUF; its header (with the 129k-token vocabulary) is parsed once."""
    path = tiny_gguf("lossless")
    return path, Inventory.from_gguf(path)


def test_gguf_inventory_is_the_files(tiny):
    path, inv = tiny
    with GGUFFile(path) as gf:
        assert {w.name: w.nbytes for w in inv.tensors} == {t.name: t.nbytes for t in gf.tensors.values()}
        assert inv.args == gf.args
        assert check_fits(gf, ram=16 * G, vram=0, ctx="4K").where == check_fits(inv, ram=16 * G, vram=0, ctx="4K").where
    assert inv.recipe == "lossless"  # from the file's metadata


def test_gguf_check_fits(tiny):
    _, inv = tiny
    big = check_fits(inv, ram=16 * G, vram=0, ctx="64K")
    assert big.paged == 0 and set(big.where.values()) == {RAM} and big.ctx == 65_536
    assert check_fits(inv, ram=16 * G, vram=0).ctx == inv.args.max_position_embeddings  # no --ctx: the largest
    # just enough RAM for every layer's non-expert set and the KV: experts and embedding page from disk
    kv = kv_bytes(inv.args, "fp8", 65_536)
    need = sum(w.nbytes for w in inv.tensors if w.role not in (N.EXPS, N.EMBED)) + kv
    tight = check_fits(inv, ram=OS_RESERVE + need + 1000, vram=0, ctx="64K")
    assert tight.runs and tight.paged > 0 and tight.kv_format == "fp8"
    assert {w.role for w in inv.tensors if tight.where[w.name] == DISK} <= {N.EXPS, N.EMBED, N.TID2EID}
    assert any(n.startswith("Experts page from disk: ") for n in tight.notes)
    with pytest.raises(DoesNotFit) as e:
        check_fits(inv, ram=OS_RESERVE + need // 2, vram=0, ctx="64K")
    assert "at 64K tokens does not fit" in str(e.value) and e.value.hint.startswith("would fit: ")


# ---------------------------------------------------------------------------------------------- the command


def _run(capsys, *argv) -> list[str]:
    main(["plan", *argv])
    return capsys.readouterr().out.splitlines()


def test_cli_128g_cpu(capsys):
    lines = _run(capsys, "flash", "--ram", "128G", "--vram", "0", "--ctx", "1M", "--ram-bw", "90", "--disk", "1T")
    assert "flash, recipe iq3-108 on 128.0 GB RAM (CPU only), 1M context" in lines[0]
    assert lines[lines.index("RAM: 112.3 GB used of 120.0 GB (128.0 GB less 8.0 GB for the OS and runtime)"):] == [
        "RAM: 112.3 GB used of 120.0 GB (128.0 GB less 8.0 GB for the OS and runtime)",
        "disk: nothing paged from disk",
        "context: 1M tokens; runs up to 1M; all weights stay in memory up to 1M",
        "KV cache: fp8, 3.7 GB at 1M tokens, 491 MB read per token",
        "decode bound: 8.6 tokens/s, reading 10.4 GB per token: RAM 10.4 GB at 90 GB/s (given)",
        "  (memory traffic only: published runs reach 25-55% of such bounds)",
        ("Recipe iq3-108 (108.6 GB) is the best that runs from memory; lossless (161.9 GB), q8 (156.3 GB), "
         "q3k (127.2 GB) would page experts from disk. Make it with: v4 quantize flash --recipe iq3-108 --imatrix "
         "IMATRIX.gguf (from `v4 imatrix MODEL.gguf`, or llama.cpp's imatrix for the model)"),
        "Described machine: RAM as given, GPU memory as given.",
    ]
    rows = [line.split("│")[1:-1] for line in lines if line.startswith("│")]
    cells = {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}
    assert cells["routed experts, layers 0–42"] == ["100.4 GB", "RAM", "2.4 GB", "26.2"]
    assert cells["KV cache (fp8, 1M tokens)"] == ["3.7 GB", "RAM", "491 MB", "5.5"]
    assert cells["OS + runtime (reserve)"] == ["8.0 GB", "RAM", "-", "-"]


def test_cli_64g_says_what_paging_costs(capsys):
    lines = _run(capsys, "flash", "--ram", "64G", "--vram", "0", "--ctx", "1M", "--ram-bw", "90", "--disk", "1T")
    assert "disk: 29.8 GB of weights paged from disk" in lines
    assert "context: 1M tokens; runs up to 1M; no context keeps all weights in memory" in lines
    assert ("Experts page from disk: 29.8 GB of weights stay on disk (mmap) and are read as tokens route to them, "
            "≈0.7 GB per token at 3.0 GB/s = 233 ms of the 334 ms per token (70% of decode time).") in lines
    assert "Disk bandwidth assumed 3.0 GB/s; measure yours and pass --disk-bw." in lines


def test_cli_quantize_fit(capsys):
    main(["quantize", "flash", "--fit", "128G", "--ctx", "1M", "--dry-run"])
    err = capsys.readouterr().err
    assert err.splitlines()[0] == ("--fit 128 GB: recipe q2k-q3k (108.4 GB) + fp8 KV at 1,048,576 tokens (3.68 GB) "
                                   "+ 8 GB for the OS leaves 7.9 GB; with an importance matrix, iq3-108 (108.6 GB, "
                                   "better) fits: `v4 imatrix MODEL.gguf -o imatrix.gguf`, then add --imatrix "
                                   "imatrix.gguf")


def test_cli_refuses_with_the_fix(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "flash", "--ram", "16G", "--vram", "0", "--ctx", "1M", "--ram-bw", "90", "--disk", "1T"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: flash quantized with iq2-80 at 1M tokens does not fit 16.0 GB RAM")
    assert "(would fit: --ctx " in err


def test_cli_gguf(capsys, tiny):
    path, inv = tiny
    lines = _run(capsys, str(path), "--ram", "16G", "--vram", "0", "--ctx", "64K", "--ram-bw", "90", "--disk", "1T")
    p = check_fits(inv, ram=16 * G, vram=0, ctx="64K")
    assert p.kv_format == "bf16"  # a small cache: the exact format costs under 5% of decode time
    assert lines[lines.index("disk: nothing paged from disk") - 1:] == [
        "RAM: 151 MB used of 8.0 GB (16.0 GB less 8.0 GB for the OS and runtime)",
        "disk: nothing paged from disk",
        "context: 64K tokens; runs up to 1M; all weights stay in memory up to 1M",
        "KV cache: bf16, 7 MB at 64K tokens, 3 MB read per token",
        f"decode bound: {p.tokens_per_second:.1f} tokens/s, reading 75 MB per token: RAM 75 MB at 90 GB/s (given)",
        "  (memory traffic only: published runs reach 25-55% of such bounds)",
        "Described machine: RAM as given, GPU memory as given.",
    ]


def _no_measuring(*_a, **_k):
    raise AssertionError("a described machine must not be measured here")


def test_cli_described_machine_says_what_it_assumed(capsys, monkeypatch):
    """--ram/--vram describe another machine: this one's bandwidth is not measured and its free disk is not used."""
    monkeypatch.setattr(machine_mod, "measure_bandwidth", _no_measuring)
    monkeypatch.setattr(machine_mod, "_free_disk", lambda _p: 1)  # this machine's disk: full
    lines = _run(capsys, "--ram", "128G", "--vram", "0", "--ctx", "1M")
    assert "decode bound: 8.6 tokens/s, reading 10.4 GB per token: RAM 10.4 GB at 90 GB/s (assumed)" in lines
    assert not [line for line in lines if "free." in line]  # no "only 0.0 GB is free" from this machine's disk
    assert lines[-1] == ("Described machine: RAM as given, GPU memory as given; RAM bandwidth assumed 90 GB/s "
                         "(pass --ram-bw); free disk not checked (pass --disk).")


def test_cli_this_machine_is_measured(capsys, monkeypatch):
    monkeypatch.setattr(machine_mod, "measure_bandwidth", lambda device="cpu", *_a, **_k: {"bound_gbs": 45.0})
    monkeypatch.setattr(machine_mod, "gpu_free_memory", lambda: 0)
    monkeypatch.setattr("psutil.virtual_memory", lambda: type("VM", (), {"total": 128 * G})())
    monkeypatch.setattr(machine_mod, "_free_disk", lambda _p: 10 * G)
    lines = _run(capsys, "-m", "flash", "--ctx", "1M")
    assert "RAM 10.4 GB at 45 GB/s (measured)" in [line for line in lines if line.startswith("decode")][0]
    assert "The GGUF needs 108.6 GB of disk in the store; only 10.0 GB is free." in lines
    assert not [line for line in lines if line.startswith("Described machine")]


def test_cli_paging_recipe_is_called_the_smallest(capsys):
    lines = _run(capsys, "flash", "--ram", "64G", "--vram", "0", "--ctx", "1M", "--ram-bw", "90", "--disk", "1T")
    why = next(line for line in lines if line.startswith("Recipe "))
    assert why.startswith("Recipe iq2-80 (81.2 GB) is the smallest, and even it pages experts from disk; lossless")
    assert "would page more." in why and "runs at all" not in why
