"""DeepSeek-V4 model code: the forward pass, its per-sequence state and that state's sizes."""

from v4cli.model.cache import ModelCache
from v4cli.model.deepseek4 import DeepseekV4

__all__ = ["DeepseekV4", "ModelCache"]
