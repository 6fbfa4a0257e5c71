#!/usr/bin/env python3
"""Install v4 with the torch build that fits this machine: `python3 install.py` (`--test`: with the test extras).

Plain `pip install -e .` on Linux resolves PyPI's torch, the CUDA build: about 3 GB of nvidia-* and triton wheels
that a machine without an NVIDIA GPU never uses. So: with an NVIDIA GPU, plain pip. Without one, ask pip what it
would install and, if that pulls CUDA wheels, pin a CPU build of torch in the same install: the newest `+cpu`
build pip's configured sources already offer (an index or find-links), else PyTorch's CPU index. A final dry run
checks that installing the project keeps that torch.

Standard library only: it runs before anything is installed. Extra arguments go to every `pip install`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one folder per GPU while the NVIDIA kernel module is loaded

Pip = Callable[[Sequence[str]], subprocess.CompletedProcess]


class InstallError(Exception):
    """Installing failed; the message says what to do."""


def run_pip(args: Sequence[str]) -> subprocess.CompletedProcess:
    """`python -m pip ARGS` for the interpreter running this script (the one v4 is installed into)."""
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False)


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver with at least one GPU: the kernel module's GPU list, else `nvidia-smi -L`."""
    if NVIDIA_GPUS.is_dir() and any(NVIDIA_GPUS.iterdir()):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(line.startswith("GPU ") for line in out.stdout.splitlines())


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def cuda_wheels(plan: list[tuple[str, str]]) -> list[str]:
    """The CUDA runtime wheels in a plan of (name, version): nvidia-* and triton (torch's GPU compiler)."""
    return [n for n, _ in plan if _norm(n).startswith("nvidia-") or _norm(n) in ("triton", "pytorch-triton")]


class Unresolvable(InstallError):
    """pip cannot resolve a set of requirements; the message is the end of what pip said."""


def dry_run(pip: Pip, reqs: Sequence[str]) -> list[tuple[str, str]]:
    """What `pip install REQS` would install, as (name, version); Unresolvable if pip cannot resolve it."""
    with tempfile.TemporaryDirectory(prefix="v4-install-") as tmp:
        report = Path(tmp) / "report.json"
        res = pip(["install", "--dry-run", "--quiet", "--report", str(report), *reqs])
        if res.returncode != 0 or not report.is_file():
            said = [ln for ln in (res.stderr or "").splitlines() if ln.strip()][-8:]
            raise Unresolvable(f"pip install {' '.join(reqs)} fails:\n" + "\n".join(said))
        items = json.loads(report.read_text()).get("install", [])
    return [(i["metadata"]["name"], i["metadata"]["version"]) for i in items]


def _version_key(v: str) -> tuple:
    # enough of PEP 440 for torch's release numbers: 2.13.0+cpu → (2, 13, 0)
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0]))


def local_cpu_torches(pip: Pip) -> list[str]:
    """`+cpu` torch versions that pip's configured sources offer, newest first."""
    res = pip(["index", "versions", "torch"])
    m = re.search(r"^Available versions:(.*)$", res.stdout, re.M) if res.returncode == 0 else None
    found = [v.strip() for v in m.group(1).split(",")] if m else []
    return sorted((v for v in found if v.endswith("+cpu")), key=_version_key, reverse=True)


def plan_install(pip: Pip, target: list[str], gpu: bool, extra: Sequence[str] = ()) -> tuple[list[list[str]], str]:
    """The `pip install` argument lists to run, in order, and one line saying which torch and why."""
    if gpu:
        return [[*target, *extra]], "NVIDIA GPU found: torch as pip resolves it (the CUDA build)"
    plan = dry_run(pip, [*target, *extra])  # pip's own error (no network, an externally managed Python) ends it
    if not cuda_wheels(plan):
        return [[*target, *extra]], "no NVIDIA GPU, and pip's torch needs no CUDA wheels here"
    for version in local_cpu_torches(pip):
        pinned = [*target, f"torch=={version}", *extra]
        try:
            plan = dry_run(pip, pinned)
        except Unresolvable:  # e.g. a constraint or the project's torch range excludes this build: try the next
            continue
        if not cuda_wheels(plan):
            return [pinned], f"no NVIDIA GPU: torch {version}, the CPU build pip's sources offer"
    return ([["torch", "--index-url", CPU_INDEX, *extra], [*target, *extra]],
            f"no NVIDIA GPU: the CPU build of torch from {CPU_INDEX}")


def pip_live(args: Sequence[str]) -> int:
    """`python -m pip ARGS` with its output on the terminal (installs take minutes: show pip's progress)."""
    return subprocess.run([sys.executable, "-m", "pip", *args], check=False).returncode


def install(pip: Pip, target: list[str], gpu: bool, extra: Sequence[str] = (), say=print,
            live: Callable[[Sequence[str]], int] = pip_live) -> None:
    """Run the plan; before the project's own install after a separate torch step, check pip keeps that torch."""
    steps, why = plan_install(pip, target, gpu, extra)
    say(f"install.py: {why}")
    for i, args in enumerate(steps):
        if i and not gpu:
            pulled = cuda_wheels(dry_run(pip, args))
            if pulled:
                raise InstallError(f"installing v4 would replace the CPU torch and pull {', '.join(pulled[:3])}, ...")
        say("install.py: pip install " + " ".join(args))
        rc = live(["install", *args])
        if rc != 0:
            raise InstallError(f"pip install {' '.join(args)} failed (exit {rc}); its output is above")


def find_command(name: str = "v4", say=print) -> None:
    """Make the installed command reachable: pyenv only sees new scripts after a rehash; else say where it is."""
    if shutil.which(name) is None and shutil.which("pyenv") is not None:
        subprocess.run(["pyenv", "rehash"], check=False)
    if shutil.which(name) is None:
        where = Path(sys.executable).parent
        say(f"install.py: {name} is in {where}, which is not on PATH: add it (export PATH=\"{where}:$PATH\")")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    test = "--test" in argv
    extra = [a for a in argv if a != "--test"]
    target = ["-e", f"{ROOT}[test]" if test else str(ROOT)]
    try:
        install(run_pip, target, has_nvidia_gpu(), extra)
        find_command()
    except InstallError as e:
        print(f"install.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
