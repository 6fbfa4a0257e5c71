"""Sizes and context lengths typed by users: the one parser for every memory flag (`24G`, `128GB`, `1.5GiB`) and
every context flag (`1M`, `384K`, `65536`)."""

from __future__ import annotations

import re

from quant.errors import BadInput

# decimal like the sizes store.format_bytes prints (and GPU and RAM labels); `i` suffixes are binary
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)(B?)\s*$", re.IGNORECASE)
# contexts count tokens, and models state them in powers of two (1M = 1,048,576), so K and M are binary here
_CTX_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20}
_CTX = re.compile(r"\s*([0-9][0-9_,]*(?:\.[0-9]+)?)\s*([kKmM]?)\s*")
_CTX_HINT = "write it like 1M, 384K or 65536"


def parse_size(text: str | int) -> int:
    """`24G` → 24·10⁹, `512MB` → 512·10⁶, `1.5GiB` → 1.5·2³⁰, `4096` → 4096 bytes. BadInput otherwise."""
    if isinstance(text, int):
        if text < 0:
            raise BadInput(f"size {text} is negative")
        return text
    m = _SIZE.match(text)
    if not m or (m.group(3) and not m.group(2)):
        raise BadInput(f"cannot read {text!r} as a size", hint="write it like 24G, 128GB, 512M or 1.5GiB")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    scale = _BINARY[unit] if binary else _UNITS[unit]
    return round(number * scale)


def parse_ctx(text: str | int) -> int:
    """'1M' → 1,048,576; '384K' → 393,216; '65536' or '65,536' → 65,536. K and M are powers of two."""
    if isinstance(text, int):
        value: float = text
    else:
        m = _CTX.fullmatch(text)
        if not m:
            raise BadInput(f"cannot read context length {text!r}", hint=_CTX_HINT)
        value = float(m.group(1).replace(",", "").replace("_", "")) * _CTX_UNITS[m.group(2).upper()]
    if value < 1 or value != int(value):
        raise BadInput(f"context length {text!r} must be a whole number of tokens ≥ 1", hint=_CTX_HINT)
    return int(value)
