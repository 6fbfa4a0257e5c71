"""`v4 info PATH`: what a GGUF file or checkpoint folder holds, its KV-cache sizes and (with --plan) its placement."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from quant import keys as K
from quant.config import ModelArgs
from v4cli.model import kvsize
from v4cli import ui
from v4cli.commands.options import CTX, RAM, VRAM, model_option, pick_model
from v4cli.commands.plan import KV_AUTO, show_plan
from quant.errors import GGUFError
from v4cli.gguf_file import open_gguf
from v4cli.store import format_bytes

KV_CONTEXTS = (4096, 32768, 131072, 1048576)
KV_SHOWN = ("bf16", "fp8")


def _line(text: str) -> None:
    # soft_wrap keeps one logical line on one line at any width (tests match whole lines)
    ui.console.print(text, soft_wrap=True, markup=False, highlight=False)


def _table(*columns: str) -> Table:
    t = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right", no_wrap=True)
    return t


def _ctx(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10}K" if n % 1024 == 0 else f"{n:,}"


def _resolve(target: str) -> Path:
    """The checkpoint folder or GGUF file `target` names (v4cli.store.find_model); a model not pulled is an error."""
    from v4cli.store import HubTarget, find_model

    found = find_model(target)
    if isinstance(found, HubTarget):
        raise found.not_pulled
    return found.path


def _config_lines(args: ModelArgs) -> None:
    n = args.num_hidden_layers
    ratios = [args.layer_ratio(i) for i in range(n)]
    swa = sum(r == 0 for r in ratios)
    csa = sum(args.is_csa(i) for i in range(n))
    hca = {r for r in ratios if r not in (0, 4)}
    mtp = f" (+{args.num_nextn_predict_layers} MTP)" if args.num_nextn_predict_layers else ""
    _line(f"layers      {n}{mtp}, hidden {args.hidden_size}, {args.num_attention_heads} heads × {args.head_dim}")
    _line(f"experts     {args.n_routed_experts} routed ({args.num_experts_per_tok} used) + {args.n_shared_experts} "
          f"shared, {args.moe_intermediate_size} wide, first {args.num_hash_layers} layers hash-routed")
    _line(f"attention   {swa} window-only, {csa} CSA (ratio 4), {n - swa - csa} HCA "
          f"(ratio {'/'.join(str(r) for r in sorted(hca)) or '-'}), window {args.sliding_window}")
    _line(f"context     {args.max_position_embeddings:,} tokens, vocab {args.vocab_size:,}")


def _kv_table(args: ModelArgs) -> None:
    t = _table("KV cache", *KV_SHOWN)
    for n in KV_CONTEXTS:
        t.add_row(_ctx(n), *(format_bytes(kvsize.kv_bytes(args, f, n)) for f in KV_SHOWN))
    ui.console.print(t)


def _provenance(md: dict) -> None:
    P = K.Provenance
    for label, key in (("tool", P.TOOL), ("source", P.SOURCE_REPO), ("revision", P.SOURCE_REVISION),
                       ("recipe", P.RECIPE)):
        if key in md:
            _line(f"{label:<11} {md[key]}")
    for label, key in (("dtypes", P.SOURCE_DTYPES), ("config", P.CONFIG_JSON)):
        if key in md:
            _line(f"{label:<11} kept in {key} ({len(str(md[key])):,} chars)")


def _gguf_info(path: Path, plan: bool) -> None:
    with open_gguf(path) as f:
        if plan:
            _ = f.args  # a plan needs a deepseek4 file: UnsupportedModel before any output otherwise
        _line(f"file        {f.path}")
        if len(f.parts) > 1:
            _line(f"parts       {len(f.parts)}: " + ", ".join(p.path.name for p in f.parts))
        _line(f"size        {format_bytes(f.size)} ({f.size:,} bytes)")
        _line(f"format      GGUF v{f.version}, {len(f.tensors)} tensors, {len(f.metadata)} keys")
        _line(f"arch        {f.architecture}")
        _provenance(f.metadata)
        t = _table("type", "tensors", "bytes")
        for qtype, (count, nbytes) in f.type_histogram().items():
            t.add_row(qtype.name, str(count), format_bytes(nbytes))
        ui.console.print(t)
        if f.architecture != K.ARCH:
            return
        args = f.args
        _config_lines(args)
        try:
            f.validate_deepseek4()
            _line("check       ok: every tensor present with the shape the config implies")
        except GGUFError as e:  # shown, not fatal: info is how one finds out what is wrong with a file
            _line(f"check       FAILED: {e}")
        _kv_table(args)


def _checkpoint_info(path: Path) -> None:
    args = ModelArgs.from_config_file(path / "config.json")
    files = sorted(p for p in path.iterdir() if p.is_file())
    shards = [p for p in files if p.suffix == ".safetensors"]
    _line(f"folder      {path}")
    _line(f"shards      {len(shards)} safetensors, {format_bytes(sum(p.stat().st_size for p in shards))}")
    others = [p for p in files if p.suffix != ".safetensors"]
    if others:
        _line("files       " + ", ".join(f"{p.name} ({format_bytes(p.stat().st_size)})" for p in others))
    _config_lines(args)
    cfg = json.loads((path / "config.json").read_text())
    if "quantization_config" in cfg:
        q = cfg["quantization_config"]
        _line(f"weights     {q.get('quant_method')} {q.get('fmt', '')}, experts {cfg.get('expert_dtype', 'fp8')}")
    _kv_table(args)


def info(
    model_opt: str | None = model_option("A .gguf file or split set, a checkpoint folder or a store name."),
    target: str | None = typer.Argument(None, metavar="PATH", help="Same as -m PATH."),
    plan: bool = typer.Option(False, "--plan", help="Also show the plan `v4 plan` shows: where each component "
                              "lives (for a checkpoint, the recipe that fits), KV, context, decode bound."),
    vram: int | None = VRAM,
    ram: int | None = RAM,
    ctx: int | None = CTX,
    kv_format: str = KV_AUTO,
) -> None:
    """Describe a GGUF file or checkpoint: config, tensor types, provenance, KV sizes, placement."""
    name = pick_model(model_opt, target, required="v4 info -m MODEL.gguf, or a checkpoint folder or store name")
    path = _resolve(name)
    if path.is_dir() and (path / "config.json").is_file():
        _checkpoint_info(path)
    else:
        _gguf_info(path, plan)
    if plan:  # the very plan `v4 plan PATH` prints, by the same code
        show_plan(str(path), ram, vram, ctx, kv_format)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
