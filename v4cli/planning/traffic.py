"""Bytes one decoded token reads: the one model behind the plan's decode bound and `v4 bench`'s roofline.

Decode is memory-bandwidth bound (facts §8). A token reads every weight in full except: the routed experts
(k of E per layer), the embedding and hash-routing tables (one row each) and the MTP draft block (not run by plain
decode). Of the KV cache it reads every layer's window, all of an HCA layer's entries, a CSA layer's top-k entries
plus every indexer key (the indexer scores them all), and the compressors' state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quant import names as N
from quant.config import ModelArgs
from v4cli.model import kvsize


def read_per_token(args: ModelArgs, role: str, layer: int | None, shape: tuple[int, ...], nbytes: int) -> int:
    """Bytes of one tensor (torch-order `shape`) that a decoded token reads."""
    if layer is not None and layer >= args.num_hidden_layers:
        return 0  # the MTP draft block: only speculative decoding runs it
    if role == N.EXPS:
        return nbytes * args.num_experts_per_tok // args.n_routed_experts
    if role in (N.EMBED, N.TID2EID):
        return nbytes // (shape[0] if shape else 1)  # one row per token
    return nbytes


@dataclass(frozen=True)
class WeightRead:
    """Weight bytes one decoded token reads, split by where they live in the model."""

    fixed: int = 0  # model-level tensors: head, final norm, mHC head, one embedding row
    layers: dict[int, int] = field(default_factory=dict)  # per main layer: non-expert + active expert bytes
    experts: int = 0  # the routed-expert share of `layers`
    lookup: int = 0  # one row of each lookup table (embedding, hash routing)

    @property
    def total(self) -> int:
        return self.fixed + sum(self.layers.values())

    @property
    def non_expert(self) -> int:
        return self.total - self.experts


def weight_read(inventory) -> WeightRead:
    """The per-layer breakdown of an Inventory's read bytes (its tensors' `read`)."""
    args = inventory.args
    layers = {layer: 0 for layer in range(args.num_hidden_layers)}
    fixed = experts = lookup = 0
    for t in inventory.tensors:
        if t.role == N.EXPS:
            experts += t.read
        elif t.role in (N.EMBED, N.TID2EID):
            lookup += t.read
        if t.layer is None:
            fixed += t.read
        elif t.layer in layers:
            layers[t.layer] += t.read
    return WeightRead(fixed, layers, experts, lookup)


def kv_read_by_layer(args: ModelArgs, fmt: str, context: int) -> dict[int, int]:
    """KV bytes each main layer reads to decode one token after `context` tokens.

    `context + 1` entries are visible: the new token's own entry is written before attention runs over the cache.
    """
    n = context + 1
    entry, ikey = kvsize.entry_bytes(args, fmt), kvsize.index_key_bytes(args, fmt)
    out = {}
    for layer in range(args.num_hidden_layers):
        b = min(n, args.sliding_window) * entry
        ratio = args.layer_ratio(layer)
        if ratio:
            visible = n // ratio
            if args.is_csa(layer):
                b += min(args.index_topk, visible) * entry + visible * ikey
            else:
                b += visible * entry
        out[layer] = b
    return out


def kv_read(args: ModelArgs, fmt: str, context: int) -> int:
    """KV bytes one decoded token reads after `context` tokens: every layer's share plus the compressor state."""
    return sum(kv_read_by_layer(args, fmt, context).values()) + kvsize.compressor_state_bytes(args, context)


def decode_read(weights: WeightRead, args: ModelArgs, fmt: str, context: int) -> int:
    """Total bytes read per decoded token after `context` tokens: weights plus KV."""
    return weights.total + kv_read(args, fmt, context)
