"""RMSNorm: the plain torch reference and the fast-path dispatch.

A decode step runs ~6 RMSNorms per layer on a few KB each, where torch's ~6 ops per norm cost more than the
arithmetic. A fast kernel registered with `register(device_type, fn)` (kernels.fast_mhc registers the compiled CPU
one) replaces the reference; it may return None to decline a call, and `V4_KERNELS=reference` forces the reference.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from kernels.linear import use_fast

NormFn = Callable[[torch.Tensor, "torch.Tensor | None", float], "torch.Tensor | None"]
_FAST: dict[str, NormFn] = {}


def register(device_type: str, fn: NormFn) -> None:
    _FAST[device_type] = fn


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x · rsqrt(mean(x²) + eps) · weight over the last dim."""
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    fast = _FAST.get(x.device.type) if use_fast() else None
    y = fast(x, weight, eps) if fast is not None else None
    return y if y is not None else reference_rms_norm(x, weight, eps)
