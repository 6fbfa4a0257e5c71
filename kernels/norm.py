"""RMSNorm: the plain torch reference and the fast-path dispatch.

A decode step runs ~6 RMSNorms per layer on a few KB each, where torch's ~6 ops per norm cost more than the
arithmetic. A fast kernel registered with `register(device_type)(fn)` (kernels.fast_mhc registers the compiled CPU
one) replaces the reference; it may return None to decline a call, and `V4_KERNELS=reference` forces the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.linear import registrar, try_fast

_FAST: dict = {}
# a fast `rms_norm(x, weight, eps)` for one device type; it may return None to decline a call
register = registrar(_FAST)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x · rsqrt(mean(x²) + eps) · weight over the last dim."""
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = try_fast(_FAST, x, x, weight, eps)
    return y if y is not None else reference_rms_norm(x, weight, eps)
