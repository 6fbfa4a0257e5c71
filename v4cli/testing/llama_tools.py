"""llama.cpp's own command-line tools, `llama-imatrix` and `llama-quantize`, built from the vendored llama.cpp tree
(the llama-cpp-python sdist's, see `v4cli.testing.wild.llama_cpp_source`).

They are the interop oracle for importance matrices: llama-imatrix computes one on a GGUF we made, llama-quantize
must accept one we wrote. Built once into `$V4_LLAMA_TOOLS` (default `~/.cache/v4-test/llama-tools`), atomically:
configured and compiled in a temporary folder beside it, the two binaries copied into a staging folder that is
renamed into place, so an interrupted build never leaves a half-made cache.

Build flags and why:
  * only the two targets, Release, static (no shared libs to find at run time), no tests/examples/server/app,
    no OpenSSL/curl (nothing is downloaded; `LLAMA_CURL` is deprecated in this tree and only warns);
  * `GGML_NATIVE=OFF` with AVX/AVX2/FMA/F16C/BMI2 and no AVX-512: `-march=native` on an AMX CPU compiles ggml's AMX
    extra buffer type, which llama.cpp then offers for weights and which aborts scheduling on this model's
    non-matmul ops (the reason our python llama engine disables extra buffer types). Without AVX-512 no AMX code
    exists, and the binaries run on any x86-64-v3 CPU, so a cache copied between machines still works.
    llama-imatrix is also run with `--no-repack` (common's switch for "no extra buffer types") as a second guard.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

TOOLS = ("llama-imatrix", "llama-quantize")

CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON",
    "-DGGML_AVX512=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
)


def tools_dir() -> Path:
    """Where the binaries live: `$V4_LLAMA_TOOLS`, else `<XDG cache>/v4-test/llama-tools`."""
    env = os.environ.get("V4_LLAMA_TOOLS")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "v4-test" / "llama-tools"


def build_command(src: Path, build: Path) -> list[str]:
    """The cmake configure command (recorded in the cache's BUILD-INFO and in tests/data/README.md)."""
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    return ["cmake", "-S", str(src), "-B", str(build), *gen, *CMAKE_FLAGS]


def llama_tool(name: str, build: bool = True) -> Path:
    """The path of llama.cpp's `name` binary (one of TOOLS). Builds both tools once when missing and `build` is
    true; with `build=False` a missing binary raises FileNotFoundError (tests use that to skip, never to build)."""
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r}; known: {', '.join(TOOLS)}")
    path = tools_dir() / "bin" / name
    if path.is_file() and os.access(path, os.X_OK):
        return path
    if not build:
        raise FileNotFoundError(f"{path} is not built; run python -m v4cli.testing.llama_tools to build it")
    _build()
    return path


def _build() -> None:
    """Configure + compile in a temp dir beside the cache, then rename the staged bin/ folder into place. A lock
    file makes a second concurrent caller wait for the first build instead of running its own."""
    from v4cli.testing.wild import llama_cpp_source

    dest = tools_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all((dest / "bin" / t).is_file() for t in TOOLS):
            return
        src = llama_cpp_source()
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-build-") as tmp:
            bdir = Path(tmp) / "build"
            cfg = build_command(src, bdir)
            jobs = str(max(1, os.cpu_count() or 1))
            make = ["cmake", "--build", str(bdir), "--config", "Release", "-j", jobs, "--target", *TOOLS]
            for cmd in (cfg, make):
                r = subprocess.run(["nice", "-n", "10", *cmd], capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
            stage = Path(tmp) / "out"
            (stage / "bin").mkdir(parents=True)
            for t in TOOLS:
                shutil.copy2(bdir / "bin" / t, stage / "bin" / t)
            (stage / "BUILD-INFO").write_text(f"source: {src}\nconfigure: {' '.join(cfg)}\nbuild: {' '.join(make)}\n")
            if dest.exists():  # a partial or stale cache (e.g. one tool deleted by hand): replace it whole
                shutil.rmtree(dest)
            os.replace(stage, dest)


if __name__ == "__main__":
    for tool in TOOLS:
        print(llama_tool(tool))
