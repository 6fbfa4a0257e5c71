"""GGUF files "from the wild", made by llama.cpp's own tools: its converter (`convert_hf_to_gguf.py`, run with its
own gguf-py) and its quantizer (`llama_model_quantize`), as vendored in the llama-cpp-python 0.3.36 sdist.

Community V4 quants are made this way, so these files carry what ours do not: llama.cpp's key set (no
`tokenizer.huggingface.json`, `pre = joyai-llm`), its per-tensor type choices and fallbacks (Q5_0/Q4_0/IQ4_NL for
rows that are not a multiple of 256), and every ftype's mix. The sdist is fetched from PyPI once (pip) and kept.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from quant.imatrix import Imatrix

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
_SDIST = "llama_cpp_python-0.3.36"

# llama.cpp ftypes by name (include/llama.h `LLAMA_FTYPE_MOSTLY_*`), with whether its quantizer insists on an
# importance matrix for them (tensor_requires_imatrix: IQ1/IQ2 types, IQ3_XXS, and Q2_K_S's Q2_K tensors).
FTYPES: dict[str, tuple[int, bool]] = {
    "F16": (1, False), "Q4_0": (2, False), "Q4_1": (3, False), "Q8_0": (7, False), "Q5_0": (8, False),
    "Q5_1": (9, False), "Q2_K": (10, False), "Q3_K_S": (11, False), "Q3_K_M": (12, False), "Q3_K_L": (13, False),
    "Q4_K_S": (14, False), "Q4_K_M": (15, False), "Q5_K_S": (16, False), "Q5_K_M": (17, False),
    "Q6_K": (18, False), "IQ2_XXS": (19, True), "IQ2_XS": (20, True), "Q2_K_S": (21, True), "IQ3_XS": (22, True),
    "IQ3_XXS": (23, True), "IQ1_S": (24, True), "IQ4_NL": (25, False), "IQ3_S": (26, False), "IQ3_M": (27, False),
    "IQ2_S": (28, True), "IQ2_M": (29, True), "IQ4_XS": (30, False), "IQ1_M": (31, True), "BF16": (32, False),
    "MXFP4_MOE": (38, False),
}


@dataclass(frozen=True)
class Layout:
    """A community recipe, as llama-quantize makes it: a base ftype, then per-tensor overrides (regex → ggml type;
    the first match wins, as in llama.cpp). `{last}` in a pattern is the alternation of the last layers' numbers
    (the share of layers a recipe protects at the end, scaled to the model's depth)."""

    base: str
    overrides: tuple[tuple[str, str], ...]
    imatrix: bool
    last_share: float = 0.0
    note: str = ""

    def resolved(self, n_layers: int) -> dict[str, str]:
        last = max(1, round(self.last_share * n_layers)) if self.last_share else 0
        alt = "|".join(str(i) for i in range(n_layers - last, n_layers)) or "none"
        return {pat.replace("{last}", f"({alt})"): typ for pat, typ in self.overrides}


_DENSE_F16 = (("token_embd", "F16"), ("ffn_gate_inp", "F16"), ("compressor", "F16"), ("indexer", "F16"),
              ("hc_", "F16"))
# The published layouts of facts §10, copied as closely as the descriptions allow.
COMMUNITY_LAYOUTS: dict[str, Layout] = {
    # ds4 "q2-q4": IQ2_XXS gate/up + Q2_K down, Q4_K on the last 6 of 43 layers; Q8_0 attention, shared experts,
    # head; F16 embedding, routers, compressors, indexer, mHC
    "ds4-q2-q4": Layout("Q8_0", (
        (r"blk\.{last}\.ffn_(gate|up|down)_exps", "Q4_K"), (r"ffn_(gate|up)_exps", "IQ2_XXS"),
        (r"ffn_down_exps", "Q2_K"), *_DENSE_F16), imatrix=True, last_share=6 / 43, note="90.9 GiB for Flash"),
    # AtomicChat AD-IQ2_XXS / AD-IQ3_XXS: IQ routed experts, the dense set at Q8_0 (78.5 / 108.1 GB for Flash)
    "ad-iq2_xxs": Layout("Q8_0", ((r"ffn_(gate|up|down)_exps", "IQ2_XXS"),), imatrix=True, note="78.5 GB"),
    "ad-iq3_xxs": Layout("Q8_0", ((r"ffn_(gate|up|down)_exps", "IQ3_XXS"),), imatrix=True, note="108.1 GB"),
    # an unsloth-UD-like dynamic K-quant mix: Q2_K gate/up, Q3_K down, the first layer's experts Q4_K, attention
    # at Q5_K/Q6_K, the rest Q8_0
    "ud-k": Layout("Q8_0", (
        (r"blk\.0\.ffn_(gate|up|down)_exps", "Q4_K"), (r"ffn_(gate|up)_exps", "Q2_K"), (r"ffn_down_exps", "Q3_K"),
        (r"attn_(q_b|output_b)", "Q6_K"), (r"attn_(q_a|kv|output_a)\.", "Q5_K")), imatrix=False),
}


def llama_cpp_source(cache: Path | None = None) -> Path:
    """The vendored llama.cpp tree of the llama-cpp-python sdist: `$V4_LLAMA_CPP_SRC`, else a cached copy, else
    downloaded from PyPI with pip and unpacked (once)."""
    env = os.environ.get("V4_LLAMA_CPP_SRC")
    if env:
        return Path(env)
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "v4-test"
    src = cache / _SDIST / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        LLAMA_CPP_PYTHON, "-d", tmp], check=True)
        with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tf:
            tf.extractall(tmp, filter="data")
        os.replace(Path(tmp) / _SDIST, cache / _SDIST)
    return src


def llama_convert(ckpt: Path, out: Path, src: Path | None = None, outtype: str | None = None) -> Path:
    """llama.cpp's converter on an official-layout checkpoint folder, with llama.cpp's own gguf-py."""
    src = src or llama_cpp_source()
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(ckpt), "--outfile", str(out)]
    if outtype:
        cmd += ["--outtype", outtype]
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py"), "NO_LOCAL_GGUF": ""}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{r.stderr[-3000:]}")
    return out


def random_imatrix(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A positive importance per input column of every 2-D/3-D weight of a GGUF (per expert for 3-D ones),
    shaped as llama.cpp's quantizer takes it: name → f32 [n_expert · n_per_row]."""
    from v4cli.gguf_file import GGUFFile

    rng = np.random.default_rng(seed)
    out = {}
    with GGUFFile(path) as gf:
        for name, t in gf.tensors.items():
            if len(t.shape) >= 2:
                n = t.shape[-1] * (t.shape[0] if len(t.shape) == 3 else 1)
                out[name] = rng.uniform(0.1, 2.0, n).astype(np.float32)
    return out


def llama_quantize(src: Path, dst: Path, ftype: str, *, imatrix: dict[str, np.ndarray] | None = None,
                   overrides: dict[str, str] | None = None, threads: int = 2) -> Path:
    """`llama_model_quantize` (requantizing allowed) to `ftype`, in a child process: llama.cpp aborts the process
    on some errors. `overrides` maps a tensor-name regex to a ggml type name (llama-quantize's --tensor-type)."""
    with tempfile.TemporaryDirectory() as tmp:
        im = None
        if imatrix is not None:
            im = str(Path(tmp) / "imatrix.npz")
            np.savez(im, **imatrix)
        args = json.dumps({"src": str(src), "dst": str(dst), "ftype": FTYPES[ftype][0], "imatrix": im,
                           "overrides": overrides or {}, "threads": threads})
        r = subprocess.run([sys.executable, "-m", "v4cli.testing.wild", args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama_model_quantize to {ftype} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return dst


def quantize_layout(src: Path, dst: Path, layout: str, n_layers: int, threads: int = 2) -> Path:
    """`src` (a high-precision GGUF) made into community layout `layout` by llama.cpp's quantizer."""
    lay = COMMUNITY_LAYOUTS[layout]
    return llama_quantize(src, dst, lay.base, imatrix=random_imatrix(src) if lay.imatrix else None,
                          overrides=lay.resolved(n_layers), threads=threads)


def layout(path: Path) -> dict[str, str]:
    """GGUF tensor name → ggml type name."""
    from v4cli.gguf_file import open_gguf

    with open_gguf(path) as gf:
        return {name: t.qtype.name for name, t in gf.tensors.items()}


def same_layout(ours: Path, im: Imatrix | None = None) -> tuple[dict[str, str], dict[str, np.ndarray] | None]:
    """(llama-quantize tensor-type overrides, its importance data) that make llama.cpp's quantizer write exactly the
    tensor types of the GGUF `ours`, guided by the same importance values as `im`."""
    from v4cli.gguf_file import open_gguf

    with open_gguf(ours) as gf:
        shapes = {name: t.shape for name, t in gf.tensors.items()}
    overrides = {f"^{re.escape(n)}$": t for n, t in layout(ours).items() if len(shapes[n]) >= 2 and t != "I32"}
    if im is None:
        return overrides, None
    imatrix = {}
    for name in im.sums:
        shape = shapes.get(name)
        if shape is None:
            continue
        imp = im.importance(name, shape[-1])
        # llama.cpp takes one vector per 2-D tensor (ne0) or per expert (ne0·ne2); the grouped output projection's
        # per-group entries have no place there (it stays Q8_0, which ignores importance, in every recipe)
        if imp.shape[0] == (shape[0] if len(shape) == 3 else 1):
            imatrix[name] = imp.reshape(-1)
    return overrides, imatrix


def quantize_like(src: Path, ours: Path, dst: Path, im: Imatrix | None = None, threads: int = 2) -> Path:
    """llama.cpp's quantizer from `src` to exactly the tensor types of `ours`, with the same importance values:
    the same layout made by the other tool, to compare quantizers alone."""
    if dst.exists():
        return dst
    overrides, imatrix = same_layout(ours, im)
    llama_quantize(src, dst, "Q8_0", imatrix=imatrix, overrides=overrides, threads=threads)
    want, got = layout(ours), layout(dst)
    diff = {n: (t, got.get(n)) for n, t in want.items() if got.get(n) != t}
    if diff:
        raise RuntimeError(f"llama.cpp's file differs in layout from ours: {dict(list(diff.items())[:5])}")
    return dst


def _quantize_child(args: dict) -> int:
    import llama_cpp
    from gguf import GGMLQuantizationType

    p = llama_cpp.llama_model_quantize_default_params()
    p.nthread, p.ftype, p.allow_requantize = args["threads"], args["ftype"], True
    keep = []  # ctypes buffers referenced by the params until the call returns
    if args["imatrix"]:
        data = dict(np.load(args["imatrix"]))
        arr = (llama_cpp.llama_model_imatrix_data * (len(data) + 1))()
        for i, (name, v) in enumerate(data.items()):
            v = np.ascontiguousarray(v, dtype=np.float32)
            keep += [name.encode(), v]
            arr[i].name, arr[i].data, arr[i].size = keep[-2], v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
        p.imatrix = arr
        keep.append(arr)
    if args["overrides"]:
        # llama-quantize's --tensor-type list: ordered, the first matching pattern wins
        arr = (llama_cpp.llama_model_tensor_override * (len(args["overrides"]) + 1))()
        for i, (pat, typ) in enumerate(args["overrides"].items()):
            keep.append(pat.encode())
            arr[i].pattern, arr[i].type = keep[-1], int(GGMLQuantizationType[typ])
        p.tt_overrides = arr
        keep.append(arr)
    return llama_cpp.llama_model_quantize(args["src"].encode(), args["dst"].encode(), ctypes.byref(p))


if __name__ == "__main__":
    sys.exit(_quantize_child(json.loads(sys.argv[1])))
