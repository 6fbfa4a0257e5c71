"""Build and load the C++ CPU kernels (kernels/cpu/*.cpp) as a plain shared library called through ctypes.

The sources ship inside the package; the first use compiles them with the system C++ compiler into torch's
extensions folder (`$XDG_CACHE_HOME/torch_extensions`, else ~/.cache/torch_extensions), keyed by a hash of the sources,
flags and compiler, and later uses load the cached library. That folder, unlike `$V4_HOME`, does not move when
tests point `V4_HOME` at a temporary directory, so one build serves every session. A plain C ABI instead of a torch extension keeps the one-time build to
seconds (torch/extension.h alone costs ~30 s on two cores). `load()` raises KernelBuildError when no compiler is
found or the build fails; callers keep the torch reference then. The engine loads the library when it loads a model
(v4cli/engine/loader.py), so the compile is part of loading, never of a timed prefill; `on_build` lets the CLI show it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants as gq

from quant import ggml
from quant.errors import V4Error

# every .cpp here is one translation unit of the library; the .inc files are included by them
SOURCES = ("qmatmul.cpp", "qmatmul_isa.inc", "iquant_isa.inc", "qgemm_isa.inc", "mhc.cpp", "attention.cpp",
           "decode.cpp", "hsum.inc")
# -ffp-contract=off keeps the dequantizers' multiply-then-subtract bit-exact with kernels/dequant.py;
# -fopenmp links libgomp.so.1, which resolves to the copy torch already loaded (one thread pool, torch's count).
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-fno-math-errno")
SRC_DIR = Path(__file__).parent / "cpu"


class KernelBuildError(V4Error):
    """The CPU kernels could not be compiled or loaded; the torch reference path still works."""


log = logging.getLogger(__name__)
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
BUILD_NOTE = "building CPU kernels, once"
_reporter: Callable[[str], AbstractContextManager] | None = None


def on_build(reporter: Callable[[str], AbstractContextManager] | None) -> None:
    """Wrap every compile in `reporter(BUILD_NOTE)` (the CLI: a note and a spinner on stderr); None: compile silently.
    A cached library is loaded without it."""
    global _reporter
    _reporter = reporter


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise KernelBuildError("no C++ compiler found (set CXX or install g++)")
    return cxx


def _build_key(cxx: str) -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((SRC_DIR / name).read_bytes())
    h.update(" ".join(FLAGS).encode())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    h.update(cxx.encode() + version.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """Where built libraries live: `v4_qmatmul/` under torch's extensions build root."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root()) / "v4_qmatmul"


def build(force: bool = False) -> Path:
    """Compile the kernels unless a library for these sources is cached; return its path."""
    cxx = _compiler()
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"v4_qmatmul_{_build_key(cxx)}.so"
    if lib.exists() and not force:
        return lib
    # Built under a temporary name and renamed, so a concurrent or interrupted build never leaves a half-written .so.
    fd, tmp = tempfile.mkstemp(prefix=lib.stem, suffix=".so.tmp", dir=out_dir)
    os.close(fd)
    try:
        with (_reporter or nullcontext)(BUILD_NOTE):
            _compile(cxx, tmp)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _compile(cxx: str, out: str) -> None:
    cmd = [cxx, *FLAGS, *(str(SRC_DIR / n) for n in SOURCES if n.endswith(".cpp")), "-o", out]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise KernelBuildError(f"compiling the CPU kernels failed:\n{res.stderr.strip()[-2000:]}")


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, i32, ptr, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    lib.v4_isa.restype = i32
    lib.v4_isa.argtypes = []
    lib.v4_set_isa.restype = i32
    lib.v4_set_isa.argtypes = [i32]
    lib.v4_supported.restype = i32
    lib.v4_supported.argtypes = [i32, i64]
    lib.v4_set_grid.restype = i32
    lib.v4_set_grid.argtypes = [i32, ptr, i64]
    lib.v4_block_layout.restype = i32
    lib.v4_block_layout.argtypes = [i32, ptr, ptr]
    lib.v4_needs_grid.restype = i32
    lib.v4_needs_grid.argtypes = [i32]
    lib.v4_matmul.restype = i32
    lib.v4_matmul.argtypes = [i32, ptr, i64, i64, ptr, i64, ptr, i32]
    lib.v4_gemm_supported.restype = i32
    lib.v4_gemm_supported.argtypes = [i32, i64]
    lib.v4_gemm.restype = i32
    lib.v4_gemm.argtypes = [i32, ptr, i64, i64, ptr, i64, ptr, i32]
    lib.v4_dequant.restype = i32
    lib.v4_dequant.argtypes = [i32, ptr, i64, i64, ptr, i32]
    lib.v4_matmul_batch.restype = i32
    lib.v4_matmul_batch.argtypes = [i32, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr, i32]
    lib.v4_moe.restype = i32
    lib.v4_moe.argtypes = [ptr, i64, i64, ptr, ptr, i64, i32, ptr, i32, ptr, i32, ptr, i64, i64, f32, ptr, i32]
    lib.v4_index_scores.restype = i32
    lib.v4_index_scores.argtypes = [ptr, ptr, ptr, i32, i64, i64, i64, f32, ptr, i32]
    return lib


def _values(name: str) -> np.ndarray:
    """gguf-py's value table of quant class `name` as int8: its `kvalues`, else its lattice entry after entry."""
    cls = getattr(gq, name)
    if hasattr(cls, "kvalues"):
        return np.array(cls.kvalues, dtype=np.int8)
    cls.init_grid()
    return np.asarray(cls.grid, dtype=np.float32).reshape(-1).astype(np.int8)  # small integers: exact


def _tables(lib: ctypes.CDLL) -> dict[GGMLQuantizationType, np.ndarray]:
    """The value tables the library's kernels decode with (the types it says need one), as the one type table
    (quant.ggml.TYPES) names them in gguf-py (the one copy of that data)."""
    return {t: _values(info.values) for t, info in ggml.TYPES.items() if info.values and lib.v4_needs_grid(int(t))}


def layout(lib: ctypes.CDLL, qtype: GGMLQuantizationType) -> tuple[int, int]:
    """(elements, bytes) per block of `qtype` as the library decodes it; (0, 0) for a type it has no kernels for."""
    elems, nbytes = ctypes.c_int64(), ctypes.c_int64()
    lib.v4_block_layout(int(qtype), ctypes.byref(elems), ctypes.byref(nbytes))
    return elems.value, nbytes.value


def _set_tables(lib: ctypes.CDLL) -> None:
    """Hand the tables to the library. One it refuses (a gguf-py whose table differs from the layout the kernels
    decode) leaves only that type without kernels, so it keeps the torch reference."""
    for qtype, values in _tables(lib).items():
        values = np.ascontiguousarray(values)
        if lib.v4_set_grid(int(qtype), values.ctypes.data, values.size) != 0:
            log.warning("the CPU kernels refused gguf-py's %s table (%d values); %s uses the torch reference",
                        qtype.name, values.size, qtype.name)


def load() -> ctypes.CDLL:
    """The loaded kernel library (built on first use, once per process), with its I-quant tables set."""
    global _lib
    with _lock:
        if _lib is None:
            # torch (imported above) has loaded its libgomp.so.1, so the library's libgomp.so.1 resolves to it
            try:
                lib = _bind(ctypes.CDLL(str(build())))
            except OSError as e:
                raise KernelBuildError(f"loading the CPU kernels failed: {e}") from e
            _set_tables(lib)
            _lib = lib
        return _lib


def usable() -> ctypes.CDLL | None:
    """The loaded library if it built and this CPU runs its kernels (AVX2 + FMA or better), else None (callers keep
    the torch references). Logs why not at debug level."""
    try:
        lib = load()
    except KernelBuildError as e:
        log.debug("CPU kernels unavailable, using the torch reference: %s", e)
        return None
    if lib.v4_isa() == 0:
        log.debug("CPU kernels need AVX2; using the torch reference")
        return None
    return lib


def isa() -> int:
    """0: no usable SIMD (the torch reference is used), 1: AVX2, 2: AVX-512 VNNI."""
    return load().v4_isa()


def threads() -> int:
    """Threads for the compiled kernels: torch's intra-op count (`torch.set_num_threads`, `--threads`)."""
    return torch.get_num_threads()
