"""install.py, the README's first command: which torch it installs for which machine, with pip answered by a fake
that plays a Linux machine whose plain resolution pulls PyPI's CUDA torch."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("install", Path(__file__).parents[1] / "install.py")
install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install)

TARGET = ["-e", "/src/v4"]
CUDA_PLAN = [("torch", "2.14.1"), ("nvidia-cublas-cu12", "12.8.4.1"), ("triton", "3.5.0"), ("numpy", "2.4.6")]
CPU_PLAN = [("torch", "2.13.0+cpu"), ("numpy", "2.4.6")]


class FakePip:
    """`pip install --dry-run --report` writes the plan for the requirements; `pip index versions` lists `versions`.
    A torch pinned to a +cpu version resolves without CUDA wheels; an unpinned one (or a plain version) with them,
    unless `cpu_torch_installed` (pip keeps a torch that is already there)."""

    def __init__(self, versions=("2.14.1", "2.13.0+cpu", "2.12.0+cpu", "2.13.0"), cpu_torch_installed=False,
                 unresolvable=(), error=None):
        self.versions, self.cpu_torch_installed = versions, cpu_torch_installed
        self.unresolvable, self.error = unresolvable, error  # pins pip cannot resolve; stderr of a failing pip
        self.calls, self.live = [], []

    def __call__(self, args):
        self.calls.append(list(args))
        if args[:2] == ["index", "versions"]:
            out = f"torch (2.14.1)\nAvailable versions: {', '.join(self.versions)}\n" if self.versions else ""
            return subprocess.CompletedProcess(args, 0 if self.versions else 1, out, "")
        assert args[:2] == ["install", "--dry-run"], args
        reqs = args[args.index("--report") + 2:]
        pinned = [r for r in reqs if r.startswith("torch==")]
        if self.error or (pinned and pinned[0] in self.unresolvable):
            return subprocess.CompletedProcess(args, 1, "", self.error or "ResolutionImpossible")
        cpu = self.cpu_torch_installed or (pinned and pinned[0].endswith("+cpu"))
        Path(args[args.index("--report") + 1]).write_text(json.dumps({"install": [
            {"metadata": {"name": n, "version": v}} for n, v in (CPU_PLAN if cpu else CUDA_PLAN)]}))
        return subprocess.CompletedProcess(args, 0, "", "")

    def run_live(self, args):
        self.live.append(list(args))
        if args[1:2] == ["torch"]:  # the PyTorch CPU index step: from now on pip keeps that torch
            self.cpu_torch_installed = True
        return 0


def _run(pip, gpu):
    said = []
    install.install(pip, TARGET, gpu, say=said.append, live=pip.run_live)
    return pip.live, said


def test_no_gpu_pins_the_newest_cpu_build_the_configured_sources_offer():
    pip = FakePip()
    live, said = _run(pip, gpu=False)
    assert live == [["install", *TARGET, "torch==2.13.0+cpu"]]
    assert "torch 2.13.0+cpu, the CPU build pip's sources offer" in said[0]


def test_gpu_installs_what_pip_resolves_without_asking():
    pip = FakePip()
    live, said = _run(pip, gpu=True)
    assert live == [["install", *TARGET]]
    assert pip.calls == []  # no dry run, no index lookup
    assert "NVIDIA GPU found" in said[0]


def test_no_gpu_and_no_cuda_wheels_needed_installs_plainly():
    pip = FakePip(cpu_torch_installed=True)  # e.g. a CPU torch already in the environment, or macOS
    live, _ = _run(pip, gpu=False)
    assert live == [["install", *TARGET]]


def test_no_cpu_build_in_the_sources_uses_pytorchs_cpu_index_then_checks_the_project_keeps_it():
    pip = FakePip(versions=("2.14.1", "2.13.0"))
    live, said = _run(pip, gpu=False)
    assert live == [["install", "torch", "--index-url", install.CPU_INDEX], ["install", *TARGET]]
    assert install.CPU_INDEX in said[0]
    assert pip.calls[-1][:2] == ["install", "--dry-run"] and pip.calls[-1][-2:] == TARGET  # the check ran last


def test_project_install_that_would_replace_the_cpu_torch_is_refused():
    pip = FakePip(versions=())
    pip.run_live = lambda args: pip.live.append(list(args)) or 0  # the CPU torch "installed" but pip still plans CUDA
    with pytest.raises(install.InstallError, match="replace the CPU torch and pull nvidia-cublas-cu12"):
        _run(pip, gpu=False)
    assert pip.live == [["install", "torch", "--index-url", install.CPU_INDEX]]  # the project was not installed


def test_a_cpu_build_pip_cannot_resolve_is_skipped_for_the_next():
    pip = FakePip(unresolvable=("torch==2.13.0+cpu",))  # e.g. a constraint file caps torch below it
    live, _ = _run(pip, gpu=False)
    assert live == [["install", *TARGET, "torch==2.12.0+cpu"]]


def test_pips_own_error_ends_it_with_pips_words():
    pip = FakePip(error="error: externally-managed-environment\n\nThis environment is externally managed\n")
    with pytest.raises(install.InstallError, match="(?s)fails:\nerror: externally-managed-environment\n"):
        _run(pip, gpu=False)
    assert pip.live == []


def test_cuda_wheels_names():
    plan = [("nvidia_cudnn_cu12", "9"), ("Triton", "3"), ("pytorch-triton", "3"), ("torch", "2"), ("nvidia", "1")]
    assert install.cuda_wheels(plan) == ["nvidia_cudnn_cu12", "Triton", "pytorch-triton"]


def test_pip_answers_with_the_cpu_build_on_this_machine_when_it_has_one():
    """The real pip here: what `index versions` offers is parsed into the same +cpu versions it lists."""
    res = install.run_pip(["index", "versions", "torch"])
    if res.returncode != 0 or "+cpu" not in res.stdout:
        pytest.skip("pip's sources here offer no +cpu torch")
    found = install.local_cpu_torches(install.run_pip)
    assert found and all(v.endswith("+cpu") and v in res.stdout for v in found)
    assert found == sorted(found, key=install._version_key, reverse=True)


@pytest.mark.parametrize("script, found", [
    ('echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"', True),
    ('echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver."; exit 9', False),
    ("exit 0", False),  # a driver with no GPU lists nothing
])
def test_gpu_detection_asks_nvidia_smi(script, found, tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\n{script}\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(install, "NVIDIA_GPUS", tmp_path / "no-driver")
    assert install.has_nvidia_gpu() is found


def test_gpu_detection_reads_the_drivers_gpu_list(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi at all
    monkeypatch.setattr(install, "NVIDIA_GPUS", tmp_path / "gpus")
    (tmp_path / "gpus").mkdir()
    assert not install.has_nvidia_gpu()
    (tmp_path / "gpus" / "0000:01:00.0").mkdir()
    assert install.has_nvidia_gpu()
