"""Shared fixtures: one tiny official-layout checkpoint per preset and its GGUFs, built once per session."""

from __future__ import annotations

import os

import pytest

# Exactness tests (golden logits, chunking/restore equivalence) compare f32 math, so by default every test runs
# the reference kernels; the fast int8-activation kernels are checked against them with stated tolerances in
# tests/test_cpu_kernels.py (which lifts this). Set before anything computes, fixtures included.
os.environ.setdefault("V4_KERNELS", "reference")
# Nothing a test does (store, prefix cache) may touch the user's real ~/.cache/v4.
if "V4_HOME" not in os.environ:
    import tempfile

    os.environ["V4_HOME"] = tempfile.mkdtemp(prefix="v4-test-home-")

from quant.convert import convert
from quant.recipes import get_recipe
from v4cli.testing.tiny import make_tiny_checkpoint


@pytest.fixture(autouse=True)
def kernels_as_the_environment_says():
    """After each test, the ops go back to what $V4_KERNELS says (the references, unless the run set it): a test
    that loads the fast kernels (or an engine with V4_KERNELS unset) leaves them on process-wide otherwise."""
    yield
    from kernels import backends

    backends.load()


@pytest.fixture
def fast_kernels(monkeypatch):
    """The fast kernels for one test: V4_KERNELS unset (engines it loads use them too) and the backends loaded."""
    from kernels import backends

    monkeypatch.delenv("V4_KERNELS", raising=False)
    backends.load()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on shared 2-core boxes OpenMP spinning costs 10x on tiny ops."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_dir):
    """The default tiny checkpoint (small HCA ratio and window)."""
    return make_tiny_checkpoint(tiny_dir / "ckpt-tiny", preset="tiny")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_dir):
    """Factory: tiny_gguf(recipe, preset="tiny") → path of the converted GGUF, converted once per session."""
    made = {}

    def get(recipe: str = "lossless", preset: str = "tiny"):
        key = (recipe, preset)
        if key not in made:
            ckpt = make_tiny_checkpoint(tiny_dir / f"ckpt-{preset}", preset=preset)
            made[key] = convert(ckpt, tiny_dir / f"{preset}-{recipe}.gguf", get_recipe(recipe)).path
        return made[key]

    return get
