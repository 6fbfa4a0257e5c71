"""`v4 imatrix MODEL`: an importance matrix from calibration text, in llama.cpp's imatrix file format."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import typer

from v4cli import ui
from v4cli.commands.options import DEVICE, MODEL, MODEL_POSITIONAL, THREADS, pick_model
from quant.errors import BadInput

DEFAULT_TEXT = "calibration.txt"  # shipped in v4cli/assets (see CALIBRATION.md there: what it is, its licence)


def calibration_text(sources: list[str]) -> tuple[str, list[str]]:
    """(text, dataset names) from files, folders (as `v4 ask` reads them: git-aware, binaries and secrets skipped)
    and `-` (stdin); the built-in calibration set when none is given."""
    if not sources:
        from importlib import resources

        return resources.files("v4cli.assets").joinpath(DEFAULT_TEXT).read_text(encoding="utf-8"), [DEFAULT_TEXT]
    from v4cli.ingest import collect

    parts, names = [], []
    paths = [s for s in sources if s != "-"]
    if len(paths) < len(sources):
        data = sys.stdin.buffer.read().decode("utf-8", "replace")
        if not data.strip():
            raise BadInput("--text -: stdin is empty", hint="pipe text in, or pass a file or folder")
        parts.append(data)
        names.append("<stdin>")
    if paths:
        found = collect(paths)
        if not found.files:
            raise BadInput(f"no readable text in {', '.join(paths)}", hint="pass text files or a folder holding some")
        for f in sorted(found.files, key=lambda f: f.path):
            parts.append(f.text)
        names += paths
    return "\n\n".join(parts), names


def _fingerprint(model: Path, text: str, chunk_size: int, n_chunks: int) -> dict:
    """What a partial run must share with this one to be resumed."""
    st = model.stat()
    return {"model": str(model.resolve()), "model_bytes": st.st_size, "model_mtime_ns": st.st_mtime_ns,
            "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "chunk_size": chunk_size, "chunks": n_chunks}


def imatrix_cmd(
    model_opt: str | None = MODEL,
    model: str | None = MODEL_POSITIONAL,
    text: list[str] = typer.Option([], "--text", "-f", help="Calibration text: a file, a folder, or - for stdin; "
                                   "repeatable (default: the built-in set of code and prose in several languages)."),
    output: Path = typer.Option(None, "-o", "--output", help="Output imatrix (default: <model>.imatrix.gguf here)."),
    chunk_size: int = typer.Option(512, "--chunk-size", "-c", min=1, help="Tokens per chunk (llama.cpp: -c 512)."),
    chunks: int = typer.Option(0, "--chunks", min=0, help="Use at most this many chunks (0 = all)."),
    device: str = DEVICE,
    threads: int | None = THREADS,
    save_every: float = typer.Option(60.0, "--save-every", min=1.0, help="Seconds between progress saves."),
) -> None:
    """Measure which weight columns matter (mean squared activations) for `v4 quantize --imatrix`.

    Runs MODEL over the calibration text in chunks; an interrupted run resumes where it stopped when run again with
    the same model, text and chunk size. The file is llama.cpp's imatrix format: llama-quantize reads it, and
    `v4 quantize --imatrix` reads llama.cpp's."""
    import torch

    from quant.imatrix import Imatrix, load_imatrix
    from v4cli.store import find_gguf_model
    from v4cli.engine.detok import tokenizer_from_metadata
    from v4cli.engine.imatrix import calibration_windows, collect
    from v4cli.engine.loader import load_model
    from v4cli.store import atomic_open

    path = find_gguf_model(pick_model(model_opt, model))
    if threads:
        torch.set_num_threads(threads)
    out = output or Path(f"{path.name.removesuffix('.gguf')}.imatrix.gguf")
    body, datasets = calibration_text(text)
    net, gf = load_model(path, device)
    windows = calibration_windows(body, tokenizer_from_metadata(gf.metadata), gf.metadata, gf.args.bos_token_id,
                                  chunk_size)
    if chunks:
        windows = windows[:chunks]

    partial = out.with_name(f".{out.name}.partial")
    meta_path = out.with_name(f".{out.name}.partial.json")
    meta = _fingerprint(path, body, chunk_size, len(windows))
    im = None
    if partial.exists() and meta_path.exists():
        try:
            if json.loads(meta_path.read_text()) == meta:
                im = load_imatrix(partial)
                ui.err.print(f"resuming at chunk {im.chunk_count + 1} of {len(windows)} ({partial})")
        except (ValueError, BadInput) as e:
            ui.err.print(f"starting over: the partial run {partial} is unreadable ({e})")
            im = None
    if im is None:
        im = Imatrix({}, {}, datasets, 0, chunk_size)
        with atomic_open(meta_path) as f:
            f.write(json.dumps(meta).encode())

    with ui.count_progress() as bar:
        task = bar.add_task("imatrix", total=len(windows), completed=im.chunk_count)
        for rec in collect(net, net.tensors, windows, im, save=lambda m: m.save(partial), save_every_s=save_every):
            bar.update(task, completed=rec.done,
                       description=f"imatrix {rec.tokens / max(rec.seconds, 1e-9):.0f} tok/s")
    im.save(out)
    partial.unlink(missing_ok=True)
    meta_path.unlink(missing_ok=True)
    n_mat = sum(c.shape[0] for c in im.counts.values())
    ui.console.print(f"wrote {out}: {len(im.sums)} tensors ({n_mat} matrices), {im.chunk_count} chunks of "
                     f"{chunk_size} tokens from {', '.join(datasets)}")


def register(app: typer.Typer) -> None:
    app.command("imatrix")(imatrix_cmd)
