"""Importance matrices: the mean squared input activation of every column of every weight matrix, over calibration
text, as llama.cpp's `llama-imatrix` measures it (and in its file format, quant/imatrix.py).

The model runs unchanged; `kernels.dispatch.observing` shows each product's input to an `Accumulator`, which finds
the GGUF tensor (and the matrix inside it: an expert of a stacked tensor, a group of the grouped output
projection) from where the weight's bytes sit. Routed experts are fed one product per expert, so each expert's
sums count only the tokens routed to it.

Chunking follows llama-imatrix so that the two tools' files agree: the text (less one trailing newline) is
tokenized once, cut into whole windows of `chunk_size` tokens (a short tail is dropped), and each window is one
independent sequence. Where the file says to add BOS (`tokenizer.ggml.add_bos_token`), the text gets one in front
and every window's first token is replaced by it.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from kernels.dispatch import observing
from kernels.linear import QWeight
from quant import keys as K
from quant import names as N
from quant.config import ModelArgs
from quant.imatrix import Imatrix
from quant.errors import BadInput

MIN_CHUNK = 32  # below this a chunk's experts could take the fused decode path, which hides its inputs


def layout(name: str, w: QWeight, args: ModelArgs) -> tuple[int, int]:
    """(matrices, column groups) of a tensor as llama-imatrix records it: a stacked expert tensor is one matrix per
    expert; the grouped output projection (llama.cpp views the file's 2-D [groups·rank, in] tensor as
    [groups, rank, in] and multiplies each group by its own slice of the input) is one entry whose columns are the
    groups' inputs side by side, counted once per token; anything else is one matrix."""
    if len(w.shape) == 3:
        return w.shape[0], 1
    if name.endswith(".attn_output_a.weight"):
        return 1, args.o_groups
    return 1, 1


@dataclass
class _Entry:
    name: str
    start: int  # first byte's address
    end: int
    part_bytes: int  # bytes of one expert or one group
    grouped: bool  # parts are column groups of one matrix (not matrices)
    n_in: int
    sums: torch.Tensor  # (n_mat, groups · n_in) f32, on the weight's device
    counts: torch.Tensor  # (n_mat,) f64


class Accumulator:
    """Σ x² per input column and the number of rows, for every matrix a product reads: `observing(acc)`.

    Entries are made on first use: tensors no product reads (the embedding, read by rows) get none, as in
    llama.cpp's files. The head is skipped, as llama-imatrix skips it unless asked."""

    def __init__(self, tensors: Mapping[str, QWeight], args: ModelArgs, skip: tuple[str, ...] = (N.root("head.weight"),)):
        self._tensors = sorted(((w.raw.data_ptr(), name, w) for name, w in tensors.items()
                                if len(w.shape) >= 2 and name not in skip and w.raw.numel()), key=lambda e: e[0])
        self._starts = [start for start, _, _ in self._tensors]
        self._args = args
        self._live: dict[int, _Entry] = {}

    def _entry(self, w: QWeight) -> tuple[_Entry, int] | None:
        p = w.raw.data_ptr()
        i = bisect.bisect_right(self._starts, p) - 1
        if i < 0:
            return None
        e = self._live.get(i)
        if e is None:
            start, name, t = self._tensors[i]
            n_mat, groups = layout(name, t, self._args)
            n_in = t.shape[-1]
            e = self._live[i] = _Entry(name, start, start + t.raw.numel(), t.raw.numel() // (n_mat * groups),
                                       groups > 1, n_in,
                                       torch.zeros(n_mat, groups * n_in, dtype=torch.float32, device=t.device),
                                       torch.zeros(n_mat, dtype=torch.float64))
        return (e, (p - e.start) // e.part_bytes) if p < e.end else None

    def __call__(self, x: torch.Tensor, w: QWeight) -> None:
        found = self._entry(w)
        if found is None:
            return
        e, part = found
        x = x.reshape(-1, x.shape[-1])
        if x.shape[-1] != e.n_in:
            raise RuntimeError(f"{e.name}: product input has {x.shape[-1]} columns, the tensor {e.n_in}")
        mat, cols = (0, slice(part * e.n_in, (part + 1) * e.n_in)) if e.grouped else (part, slice(None))
        e.sums[mat, cols] += x.float().square().sum(0).to(e.sums.device)
        if not e.grouped or part == 0:
            e.counts[mat] += x.shape[0]

    def add_to(self, im: Imatrix) -> None:
        """Add what was accumulated into `im` (new entries are created) and reset."""
        for e in self._live.values():
            name = e.name
            s = e.sums.double().cpu().numpy()
            c = e.counts.numpy().copy()
            if name in im.sums:
                im.sums[name] = im.sums[name] + s
                im.counts[name] = im.counts[name] + c
            else:
                im.sums[name], im.counts[name] = s, c
            e.sums.zero_()
            e.counts.zero_()


def chunk_windows(ids: list[int], chunk_size: int, bos: int | None) -> list[list[int]]:
    """llama-imatrix's chunks of the text's tokens `ids`: whole windows of `chunk_size`, each starting with `bos`
    (None: the file adds no BOS, and windows are the text as it is)."""
    if chunk_size < MIN_CHUNK:
        raise BadInput(f"--chunk-size {chunk_size} is too small", hint=f"use at least {MIN_CHUNK} (llama.cpp uses 512)")
    if bos is not None:
        ids = [bos, *ids]
    n = len(ids) // chunk_size
    if n == 0:
        raise BadInput(f"the calibration text has {len(ids)} tokens, less than one chunk of {chunk_size}",
                       hint="give more text (--text) or a smaller --chunk-size")
    windows = [ids[i * chunk_size:(i + 1) * chunk_size] for i in range(n)]
    return windows if bos is None else [[bos, *w[1:]] for w in windows]


def calibration_windows(text: str, tokenizer, metadata: dict, bos_id: int, chunk_size: int) -> list[list[int]]:
    """The chunks llama-imatrix makes of `text` for a model file with this metadata (its add-BOS flag; llama.cpp's
    default for BPE vocabularies when the key is absent is to add one)."""
    text = text.removesuffix("\n")  # llama-imatrix drops one trailing newline of its text file
    add_bos = bool(metadata.get(K.Tokenizer.ADD_BOS, True))
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return chunk_windows(ids, chunk_size, bos_id if add_bos else None)


@dataclass
class ChunkRecord:
    """One chunk done: `done` of `total` chunks (resumed ones included), this run's tokens and seconds."""

    done: int
    total: int
    tokens: int
    seconds: float


def collect(model, tensors: Mapping[str, QWeight], windows: list[list[int]], im: Imatrix,
            save: Callable[[Imatrix], None] | None = None, save_every_s: float = 60.0) -> Iterator[ChunkRecord]:
    """Run `model` over the windows from `im.chunk_count` on, adding into `im`; `save(im)` every `save_every_s`
    seconds and after the last chunk, so an interrupted run loses at most that much work."""
    acc = Accumulator(tensors, model.args)
    device = model.blocks[0].device
    t0 = last_save = time.perf_counter()
    tokens = 0
    for i in range(im.chunk_count, len(windows)):
        ids = torch.tensor(windows[i], dtype=torch.long, device=device)
        with torch.no_grad(), observing(acc):  # not inference_mode: the sums outlive it
            model.streams(ids, model.make_cache("f32"))
        acc.add_to(im)
        im.chunk_count = i + 1
        tokens += len(windows[i])
        now = time.perf_counter()
        if save is not None and (now - last_save >= save_every_s or i + 1 == len(windows)):
            save(im)
            last_save = now
        yield ChunkRecord(i + 1, len(windows), tokens, now - t0)

