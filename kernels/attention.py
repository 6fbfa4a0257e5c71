"""Attention-side kernels: the lightning indexer's scores, as a plain torch reference and the fast-path dispatch.

`index_scores(q, w, keys, scale)` gives, for each query t, score[t, n] = scale · Σ_h w[t, h] · relu(q[t, h] · keys[n])
over the stored index keys (f32 or bf16 rows, as the cache holds them). At long context this is the indexer's
whole cost per layer and step; a fast kernel registered with `register(device_type)(fn)` (kernels.fast registers
the compiled CPU one, for one query at a time) replaces the reference and may return None to decline a call.
`V4_KERNELS=reference` forces the reference.
"""

from __future__ import annotations

import torch

from kernels.linear import registrar, try_fast

_FAST: dict = {}
# a fast `index_scores(q, w, keys, scale)` for one device type; it may return None to decline a call
register = registrar(_FAST)


def reference_index_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, H, d], w [T, H], keys [N, d] → scores [T, N] in f32."""
    s = torch.relu(torch.einsum("thd,nd->thn", q, keys.float())) * scale
    return torch.einsum("thn,th->tn", s, w)


def index_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    y = try_fast(_FAST, q, q, w, keys, scale)
    return y if y is not None else reference_index_scores(q, w, keys, scale)
