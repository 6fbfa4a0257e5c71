"""v4: run DeepSeek-V4-Flash locally."""

__version__ = "0.1.0"
