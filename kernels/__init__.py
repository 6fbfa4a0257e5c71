"""Torch kernels: plain reference implementations first, fast paths beside them, each checked against its reference."""
