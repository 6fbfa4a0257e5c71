"""The fast kernel backends, loaded once: each one's `install()` files what this machine can run in the ops' tables.

The engine loader calls `load()`; so do benchmarks and tests that call ops directly. Op modules never import this
module or a backend, so the kernels' imports point one way: backends → ops → kernels.dispatch.
"""

from __future__ import annotations

import os

from kernels import dispatch, fast, fast_decode, fast_mhc, gpu

_installed: dict[str, bool] | None = None


def reference_requested() -> bool:
    """Whether $V4_KERNELS asks for the plain torch references."""
    return os.environ.get("V4_KERNELS", "").lower() == "reference"


def load(reference: bool | None = None) -> dict[str, bool]:
    """Run every op on its reference (`reference`; None: as $V4_KERNELS says), or install the backends (once per
    process) and let the ops use them. Returns backend module → whether it filed kernels ({} for the references)."""
    if reference is None:
        reference = reference_requested()
    dispatch.use_reference(reference)
    return {} if reference else _install()


def _install() -> dict[str, bool]:
    global _installed
    if _installed is None:
        _installed = {m.__name__: m.install() for m in (fast, fast_mhc, fast_decode, gpu)}
    return _installed
