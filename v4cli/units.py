"""Byte sizes typed by users (`24G`, `128GB`, `512M`, `1.5Ti`): the one parser for memory flags."""

from __future__ import annotations

import re

from v4cli.errors import BadInput

# decimal like the sizes store.format_bytes prints (and GPU and RAM labels); `i` suffixes are binary
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)(B?)\s*$", re.IGNORECASE)


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
