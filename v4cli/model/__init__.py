"""DeepSeek-V4 model code: the forward pass and its per-sequence state."""

from v4cli.model.cache import ModelCache, kv_bytes_per_token
from v4cli.model.deepseek4 import DeepseekV4

__all__ = ["DeepseekV4", "ModelCache", "kv_bytes_per_token"]
