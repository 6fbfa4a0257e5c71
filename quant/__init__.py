"""Checkpoint → GGUF: the name table, the ggml formats as data, quantizers and recipes."""
