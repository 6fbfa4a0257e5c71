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
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

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
        arr = (llama_cpp.llama_model_tensor_override * (len(args["overrides"]) + 1))()
        for i, (pat, typ) in enumerate(args["overrides"].items()):
            keep.append(pat.encode())
            arr[i].pattern, arr[i].type = keep[-1], int(GGMLQuantizationType[typ])
        p.tt_overrides = arr
        keep.append(arr)
    return llama_cpp.llama_model_quantize(args["src"].encode(), args["dst"].encode(), ctypes.byref(p))


if __name__ == "__main__":
    sys.exit(_quantize_child(json.loads(sys.argv[1])))
