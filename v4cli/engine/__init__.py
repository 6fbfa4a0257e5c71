"""The torch inference engine: load a `deepseek4` GGUF, prefill, decode, stream typed records."""

from v4cli.engine.generate import Engine
from v4cli.engine.records import DoneRecord, Memory, Timings, TokenRecord
from v4cli.engine.sampling import SamplingParams

__all__ = ["Engine", "SamplingParams", "TokenRecord", "DoneRecord", "Timings", "Memory"]
