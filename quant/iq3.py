"""I-quants on 4-wide lattices (IQ3_XXS, IQ3_S) and the non-linear 4-bit IQ4_XS, vectorized over blocks.

Each quantizer maps (B, 256) f32 blocks [+ (B, 256) importance] to (B, type_size) uint8 in ggml's layout.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from quant.ggml import QType

QUANTIZERS: dict[QType, Callable[[np.ndarray, np.ndarray | None], np.ndarray]] = {}
