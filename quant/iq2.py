"""I-quants on 8-wide lattices: IQ2_XXS, IQ2_XS, IQ2_S and IQ1_M, vectorized over blocks.

Each quantizer maps (B, 256) f32 blocks [+ (B, 256) importance] to (B, type_size) uint8 in ggml's layout.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from quant.ggml import QType

QUANTIZERS: dict[QType, Callable[[np.ndarray, np.ndarray | None], np.ndarray]] = {}
