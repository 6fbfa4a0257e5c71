"""One dispatch type for every kernel op: a plain torch reference plus a table of fast implementations.

An `Op` picks its fast implementation by the device type of its inputs (and, for `linear`, the weight's ggml type);
one that returns None declines the call, and the reference runs. Backends fill the tables in `install()`, called
once by `kernels.backends.load`; nothing here or in an op module imports a backend. `use_reference(True)` (what
`load` sets under V4_KERNELS=reference) makes every op run its reference, and `observing(fn)` shows every weight
product's input to `fn` (v4 imatrix), during which fused ops decline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

Kernel = Callable[..., Any]

_reference = False


def use_reference(on: bool) -> None:
    """Every op runs its reference while `on` (set by kernels.backends.load)."""
    global _reference
    _reference = on


Observer = Callable[[torch.Tensor, Any], None]
_observer: Observer | None = None


def observer() -> Observer | None:
    """The function `observing` installed, or None."""
    return _observer


@contextmanager
def observing(fn: Observer) -> Iterator[None]:
    """Within the block, every weight product calls fn(x, w) with its input first: an importance matrix is made of
    these inputs. Experts then always go one product per expert (`linear.grouped_experts`), so that each expert's
    slice of the stacked tensor shows up with only the tokens routed to it."""
    global _observer
    prev, _observer = _observer, fn
    try:
        yield
    finally:
        _observer = prev


def _first_device(*args) -> str:
    return args[0].device.type


class Op:
    """A kernel op: `reference` (plain torch, also the fallback) and fast implementations by device type.

    `device(*args)` names the device type a call runs on (default: the first argument's). With `by_qtype`, the
    table is keyed by (ggml type, device type), the type read by `qtype(*args)`. A `fused` op runs products whose
    inputs an observer would not see, so it declines while `observing`."""

    def __init__(self, name: str, reference: Kernel, *, fused: bool = True, device: Callable[..., str] = _first_device,
                 qtype: Callable[..., Any] | None = None):
        self.name = name
        self.reference = reference
        self.fused = fused
        self._device = device
        self._qtype = qtype
        self.table: dict[Any, Kernel] = {}

    def register(self, device_type: str, fn: Kernel, qtypes: Iterable[Any] = ()) -> None:
        """File `fn` for `device_type` (for each of `qtypes` where the op is keyed by ggml type)."""
        if self._qtype is None:
            self.table[device_type] = fn
        else:
            for t in qtypes:
                self.table[(t, device_type)] = fn

    def serves(self, device_type: str) -> bool:
        """Whether a fast implementation would run on `device_type` now (backends loaded, not reference mode); for
        ops keyed by device type alone."""
        return not _reference and device_type in self.table

    def fast(self, *args) -> Kernel | None:
        """The fast implementation that would run for args, or None (reference mode, observing, none filed)."""
        if _reference or (self.fused and _observer is not None):
            return None
        dev = self._device(*args)
        return self.table.get(dev if self._qtype is None else (self._qtype(*args), dev))

    def __call__(self, *args):
        fn = self.fast(*args)
        if fn is not None:
            out = fn(*args)
            if out is not None:
                return out
        return self.reference(*args)

    def __repr__(self) -> str:
        return f"Op({self.name!r}, fast={sorted(map(str, self.table))})"
