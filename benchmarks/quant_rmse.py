"""Our numpy quantizers vs ggml's own C quantizer: RMSE and single-core throughput, side by side.

ggml is reached through the libggml-base shared library that ships inside the llama_cpp package
(`ggml_quantize_chunk`, the function llama-quantize uses). Run:

    python benchmarks/quant_rmse.py [--rows 2048] [--cols 4096] [--imatrix]

With `--imatrix` both sides also quantize with the same random importance vector, and the table reports the
importance-weighted relative RMSE (ggml then runs its separate `*_impl` search, so the algorithms differ). ggml
refuses IQ2_XXS, IQ2_XS and IQ1_M without an importance matrix; those rows show ours alone. `--types` picks rows.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np
from gguf import quants as gq

from quant.formats import quantize
from quant.ggml import QType, byte_shape, type_info

TYPES = (QType.Q8_0, QType.Q6_K, QType.Q4_K, QType.Q3_K, QType.Q2_K, QType.IQ4_XS, QType.IQ3_S, QType.IQ3_XXS,
         QType.IQ2_S, QType.IQ2_XS, QType.IQ2_XXS, QType.IQ1_M)


class GgmlQuantizer:
    """ctypes binding of ggml_quantize_chunk from llama_cpp's bundled libggml-base."""

    def __init__(self, lib_path: Path):
        self.lib = ctypes.CDLL(str(lib_path))
        f = self.lib.ggml_quantize_chunk
        f.restype = ctypes.c_size_t
        f.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        self.lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        self.lib.ggml_quantize_init.restype = None

    @classmethod
    def find(cls) -> GgmlQuantizer | None:
        """The bundled library, or None when llama_cpp is not installed."""
        try:
            import llama_cpp
        except ImportError:
            return None
        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
            if (lib_dir / name).exists():
                return cls(lib_dir / name)
        return None

    @classmethod
    def load_or_skip(cls) -> GgmlQuantizer:
        """For tests: the binding, or a pytest skip."""
        import pytest

        q = cls.find()
        if q is None:
            pytest.skip("llama_cpp (with libggml-base) is not installed")
        return q

    def quantize(self, x: np.ndarray, qtype: QType, imatrix: np.ndarray | None = None) -> np.ndarray:
        """Quantize f32 rows with ggml; returns uint8 (rows, row_bytes) like `quant.formats.quantize`."""
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
        out = np.empty(byte_shape(qtype, x.shape), np.uint8)
        qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        self.lib.ggml_quantize_init(int(qtype))
        n = self.lib.ggml_quantize_chunk(
            int(qtype),
            x.ctypes.data,
            out.ctypes.data,
            0,
            x.shape[0],
            x.shape[1],
            None if qw is None else qw.ctypes.data,
        )
        if n != out.nbytes:
            raise RuntimeError(f"ggml_quantize_chunk wrote {n} bytes, expected {out.nbytes}")
        return out


def make_tensors(rows: int, cols: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((rows, cols), dtype=np.float32)
    t3 = rng.standard_t(3, size=(rows, cols)).astype(np.float32)
    # LLM-like: per-row scale spread and a few outlier input channels.
    llm = g * np.exp(0.5 * rng.standard_normal((rows, 1))).astype(np.float32)
    llm[:, rng.choice(cols, cols // 128, replace=False)] *= 8
    return {"gaussian": g, "student-t3": t3, "llm-like": llm * np.float32(0.02)}


def random_importance(cols: int, seed: int = 1) -> np.ndarray:
    """A positive importance vector with the spread of real ones (a few columns matter far more)."""
    return (3 * np.random.default_rng(seed).standard_normal(cols) ** 2 + 0.01).astype(np.float32)


def decoded(q: np.ndarray, qtype: QType, shape: tuple[int, ...]) -> np.ndarray:
    """gguf-py's decode of ggml bytes, after checking our torch dequantizer gives the very same values."""
    import torch

    from kernels.dequant import dequantize

    ref = gq.dequantize(q, qtype)
    ours = dequantize(torch.from_numpy(np.ascontiguousarray(q)), qtype, shape).numpy()
    np.testing.assert_array_equal(ours, ref)
    return ref


def rel_rmse(y: np.ndarray, x: np.ndarray, w: np.ndarray | None) -> float:
    w = np.ones((1, x.shape[1]), np.float32) if w is None else w.reshape(1, -1)
    return float(np.sqrt(np.sum(w * (y - x) ** 2, dtype=np.float64) / np.sum(w * x * x, dtype=np.float64)))


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--imatrix", action="store_true", help="quantize with a random importance vector")
    ap.add_argument("--types", default=",".join(t.name for t in TYPES))
    args = ap.parse_args(argv)
    types = [QType[t.strip().upper()] for t in args.types.split(",")]

    ggml = GgmlQuantizer.find()
    if ggml is None:
        print("llama_cpp is not installed: showing our numbers only", file=sys.stderr)
    imx = None
    if args.imatrix:
        imx = random_importance(args.cols)

    head = (
        f"{'tensor':<11} {'type':<7} {'ours RMSE':>10} {'ggml RMSE':>10} {'ratio':>7} {'bytes eq':>8} "
        f"{'ours MB/s':>9} {'ggml MB/s':>9}"
    )
    print(
        f"relative RMSE (error RMS / data RMS{', imatrix-weighted' if imx is not None else ''}), "
        f"{args.rows}x{args.cols} f32, one thread"
    )
    print(head)
    print("-" * len(head))
    for name, x in make_tensors(args.rows, args.cols).items():
        mb = x.nbytes / 1e6
        for qtype in types:
            w = None if qtype == QType.Q8_0 else imx
            ours, t_ours = timed(quantize, x, qtype, w)
            r_ours = rel_rmse(gq.dequantize(ours, qtype), x, w)
            if ggml is not None and (w is not None or not type_info(qtype).imatrix_only):
                ref, t_ref = timed(ggml.quantize, x, qtype, w)
                r_ref = rel_rmse(gq.dequantize(ref, qtype), x, w)
                eq = f"{np.mean(ours == ref):8.4f}"
                cols = f"{r_ref:10.5f} {r_ours / r_ref:7.4f} {eq} {mb / t_ours:9.1f} {mb / t_ref:9.1f}"
            else:
                cols = f"{'-':>10} {'-':>7} {'-':>8} {mb / t_ours:9.1f} {'-':>9}"
            print(f"{name:<11} {qtype.name:<7} {r_ours:10.5f} {cols}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
