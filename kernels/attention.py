"""Attention-side kernels: the lightning indexer's scores, as a plain torch reference and the fast-path dispatch.

`index_scores(q, w, keys, scale)` gives, for each query t, score[t, n] = scale · Σ_h w[t, h] · relu(q[t, h] · keys[n])
over the stored index keys (f32 or bf16 rows, as the cache holds them). At long context this is the indexer's
whole cost per layer and step; `index_scores_op` (kernels/dispatch.py) holds the fast kernels (kernels.fast files
the compiled CPU one, for one query at a time), which may return None to decline a call (the reference runs).
"""

from __future__ import annotations

import torch

from kernels.dispatch import Op


def reference_index_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, H, d], w [T, H], keys [N, d] → scores [T, N] in f32."""
    s = torch.relu(torch.einsum("thd,nd->thn", q, keys.float())) * scale
    return torch.einsum("thn,th->tn", s, w)


index_scores_op = Op("index_scores", reference_index_scores)


def index_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    return index_scores_op(q, w, keys, scale)
