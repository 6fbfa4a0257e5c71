"""RMSNorm: the plain torch reference and the fast-path dispatch.

A decode step runs ~6 RMSNorms per layer on a few KB each, where torch's ~6 ops per norm cost more than the
arithmetic. `rms_norm_op` (kernels/dispatch.py) holds the fast kernels (kernels.fast_mhc files the compiled CPU
one); one may return None to decline a call, and the reference runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import Op


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x · rsqrt(mean(x²) + eps) · weight over the last dim."""
    return F.rms_norm(x, x.shape[-1:], weight, eps)


rms_norm_op = Op("rms_norm", reference_rms_norm)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return rms_norm_op(x, weight, eps)
