"""Attention-side kernels: the lightning indexer's scores, as a plain torch reference and the fast-path dispatch.

`index_scores(q, w, keys, scale)` gives, for each query t, score[t, n] = scale · Σ_h w[t, h] · relu(q[t, h] · keys[n])
over the stored index keys (f32 or bf16 rows, as the cache holds them). At long context this is the indexer's
whole cost per layer and step; a fast kernel registered with `register(device_type, fn)` (kernels.fast registers
the compiled CPU one, for one query at a time) replaces the reference and may return None to decline a call.
`V4_KERNELS=reference` forces the reference.
"""

from __future__ import annotations

from typing import Callable

import torch

from kernels.linear import use_fast

ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], "torch.Tensor | None"]
_FAST: dict[str, ScoreFn] = {}


def register(device_type: str, fn: ScoreFn) -> None:
    _FAST[device_type] = fn


def reference_index_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, H, d], w [T, H], keys [N, d] → scores [T, N] in f32."""
    s = torch.relu(torch.einsum("thd,nd->thn", q, keys.float())) * scale
    return torch.einsum("thn,th->tn", s, w)


def index_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    fast = _FAST.get(q.device.type) if use_fast() else None
    y = fast(q, w, keys, scale) if fast is not None else None
    return y if y is not None else reference_index_scores(q, w, keys, scale)
