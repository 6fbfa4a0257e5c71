"""`v4 plan`, `v4 info --plan`, the planning API and the loader agree: one plan, whoever asks for it.

The same machines (CPU only with 32, 64 and 128 GB; 128 GB RAM + a 24 GB GPU) for real Flash (config alone: a
checkpoint folder holding only its config.json) and for a mini-Flash GGUF (Flash's per-layer shapes, 2 layers).
"""

from __future__ import annotations

import json

import pytest
from cli_util import run_cli

from quant.config import FLASH_CONFIG
from quant.convert import convert
from quant.recipes import get_recipe
from v4cli.commands.plan import _size
from v4cli.engine.loader import placement
from v4cli.gguf_file import GGUFFile
from v4cli.planning.machine import DISK, GPU, RAM, TIERS, Machine
from v4cli.planning.plan import check_fits, plan_for
from v4cli.testing.tiny import make_tiny_checkpoint

G = 10**9
MACHINES = [("32G", "0"), ("64G", "0"), ("128G", "0"), ("128G", "24G")]
_WHERE = {"GPU": GPU, "RAM": RAM, "disk": DISK}


@pytest.fixture(scope="session")
def flash_dir(tmp_path_factory):
    """A checkpoint folder with Flash's config.json and no weights: enough to plan every recipe of it."""
    d = tmp_path_factory.mktemp("flash-config")
    (d / "config.json").write_text(json.dumps(FLASH_CONFIG))
    return d


@pytest.fixture(scope="session")
def mini_flash(tmp_path_factory):
    """A q8 mini-Flash GGUF: Flash's layer shapes with 2 layers of 8 experts."""
    d = tmp_path_factory.mktemp("mini-flash")
    ckpt = make_tiny_checkpoint(d / "ckpt", preset="mini-flash", num_hidden_layers=2, n_routed_experts=8)
    return convert(ckpt, d / "mini-flash-q8.gguf", get_recipe("q8")).path


def _machine(ram: str, vram: str) -> Machine:
    """The machine both commands describe for --ram/--vram: sizes given, bandwidths assumed, free disk unknown."""
    return Machine(ram=int(ram.removesuffix("G")) * G, vram=int(vram.removesuffix("G") or 0) * G)


def _read(out: str) -> tuple[dict[str, str], dict[str, str]]:
    """(table row → tier, tier → its "used" line) of a printed plan."""
    rows, used = {}, {}
    for line in out.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.split("│")[1:-1]]
            if cells[2]:
                rows[cells[0]] = _WHERE[cells[2]]
        elif line.startswith(("GPU: ", "RAM: ", "disk: ")):
            used[_WHERE[line.split(":")[0]]] = line
    return rows, used


def _agree(capsys, model: str, ram: str, vram: str, ctx: str) -> None:
    flags = ["--ram", ram, "--vram", vram, "--ctx", ctx]
    code, plan_out, err = run_cli(["plan", model, *flags], capsys)
    assert code == 0, err
    code, info_out, err = run_cli(["info", model, "--plan", *flags], capsys)
    assert code == 0, err
    assert info_out.endswith(plan_out)  # the same plan, printed by the same code
    rows, used = _read(plan_out)
    assert (rows, used) == _read(info_out)
    # and both are the planning API's plan: each component's tier, and the bytes per tier
    p = plan_for(model, _machine(ram, vram), int(ctx.removesuffix("K")) * 1024, "auto")
    assert rows == {r.component: r.where for r in p.rows()}
    assert used[RAM].startswith(f"RAM: {_size(p.used(RAM))} used of ")
    if p.machine.vram:
        assert used[GPU].startswith(f"GPU: {_size(p.used(GPU))} used of ")
    assert used[DISK] == (f"disk: {_size(p.paged)} of weights paged from disk" if p.paged
                          else "disk: nothing paged from disk")
    totals = {t: 0 for t in TIERS}
    for r in p.rows():
        totals[r.where] += r.nbytes
    assert totals[RAM] == p.used(RAM) + p.machine.reserve(RAM) and totals[DISK] == p.paged


@pytest.mark.parametrize("ram,vram", MACHINES)
def test_plan_and_info_agree_on_flash(capsys, flash_dir, ram, vram):
    _agree(capsys, str(flash_dir), ram, vram, "1024K")


@pytest.mark.parametrize("ram,vram", MACHINES)
def test_plan_and_info_agree_on_a_mini_flash_gguf(capsys, mini_flash, ram, vram):
    _agree(capsys, str(mini_flash), ram, vram, "64K")


@pytest.mark.parametrize("vram", [0, 3 * G, 24 * G])
def test_the_loader_places_what_the_plan_says(mini_flash, vram):
    # 3 GB leaves 0.85 GB after the reserve: the layers' dense sets fit, the 1 GB BF16 head does not
    m = Machine(ram=128 * G, vram=vram)
    with GGUFFile(mini_flash) as gf:
        p = check_fits(gf, ctx="64K", kv_format="bf16", machine=m)
        where = placement(gf, "meta", ctx=p.ctx, kv_format=p.kv_format, machine=m)
        loaded = {name: where(name).type for name in gf.tensors}
    assert loaded == {name: "meta" if p.where[name] == GPU else "cpu" for name in loaded}
    if vram == 3 * G:
        assert "meta" in loaded.values() and p.where["output.weight"] == RAM
