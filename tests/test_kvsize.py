"""KV-cache size formulas against the facts (§5) and against a direct count of stored entries."""

from __future__ import annotations

import copy

import pytest

from quant.config import FLASH_CONFIG, ModelArgs
from v4cli.model import kvsize
from quant.errors import BadInput

FLASH = ModelArgs.from_config(FLASH_CONFIG)


def test_flash_bf16_is_6880_bytes_per_token():
    # CSA 512·2/4 + 128·2/4 = 320 B, HCA 512·2/128 = 8 B, SWA 0: 21·320 + 20·8
    assert kvsize.bytes_per_token(FLASH, "bf16") == 6880
    assert kvsize.bytes_per_token(FLASH, "f32") == 2 * 6880


def test_flash_fp8_layout():
    # 448 FP8 values + 7 scale bytes + 64 BF16 rope dims; indexer key: 128 FP4 values + 4 scale bytes
    assert kvsize.entry_bytes(FLASH, "fp8") == 448 + 7 + 128
    assert kvsize.index_key_bytes(FLASH, "fp8") == 64 + 4
    per = kvsize.bytes_per_token(FLASH, "fp8")
    assert per == 21 * (583 + 68) / 4 + 20 * 583 / 128 and per <= 3600
    assert kvsize.kv_bytes(FLASH, "fp8", 1_048_576) <= 3.7e9


def test_flash_compressor_state_follows_the_window():
    # the unfinished window's kv and score rows in fp32 (2·dim wide for CSA's overlapped windows), plus CSA's
    # previous-window Ca half (ratio rows of dim) once a window has closed
    assert kvsize.compressor_state_bytes(FLASH, 0) == 0
    one_csa = 2 * 1 * 2 * 512 * 4 + 2 * 1 * 2 * 128 * 4  # one row in the attention and the indexer compressor
    one_hca = 2 * 1 * 512 * 4
    assert kvsize.compressor_state_bytes(FLASH, 1) == 21 * one_csa + 20 * one_hca
    prev = 2 * 4 * 512 * 4 + 2 * 4 * 128 * 4
    assert kvsize.compressor_state_bytes(FLASH, 128) == 21 * prev  # every window closed, HCA's too
    assert kvsize.window_bytes(FLASH, "bf16", 1000) == 43 * 127 * 512 * 2  # sliding_window - 1 rows kept


def test_kv_bytes_counts_only_complete_windows():
    def fixed(n):
        return kvsize.window_bytes(FLASH, "bf16", n) + kvsize.compressor_state_bytes(FLASH, n)

    assert kvsize.kv_bytes(FLASH, "bf16", 3) == fixed(3)  # no window of 4 closed yet
    assert kvsize.kv_bytes(FLASH, "bf16", 4) == fixed(4) + 21 * (1024 + 256)
    assert kvsize.kv_bytes(FLASH, "bf16", 128) == fixed(128) + 21 * 32 * 1280 + 20 * 1024
    n = 1 << 20  # a multiple of every ratio: exactly the per-token rate
    assert kvsize.kv_bytes(FLASH, "bf16", n) == fixed(n) + 6880 * n
    assert round((kvsize.kv_bytes(FLASH, "bf16", n) - fixed(n)) / 2**30, 2) == 6.72  # facts: 6.72 GiB at 1M


def test_against_a_direct_count_on_an_odd_schedule():
    cfg = copy.deepcopy(FLASH_CONFIG)
    cfg.update(num_hidden_layers=5, compress_ratios=[0, 4, 16, 4, 32, 0], head_dim=96, qk_rope_head_dim=32,
               index_head_dim=48, sliding_window=10)
    a = ModelArgs.from_config(cfg)
    for fmt in kvsize.KV_FORMATS:
        e, k = kvsize.entry_bytes(a, fmt), kvsize.index_key_bytes(a, fmt)
        for n in (0, 5, 63, 64, 1000):
            grown = sum((n // r) * (e + (k if r == 4 else 0)) for r in (4, 16, 4, 32))
            window = 5 * min(n, 9) * e
            state = 0
            for r, dims in ((4, (96, 48)), (16, (96,)), (4, (96, 48)), (32, (96,))):
                for d in dims:
                    count, rest = divmod(n, r)
                    state += 4 * (2 * rest * (2 * d if r == 4 else d) + (2 * r * d if r == 4 and count else 0))
            assert kvsize.kv_bytes(a, fmt, n) == window + grown + state
    assert kvsize.entry_bytes(a, "fp8") == 64 + 1 + 64  # 64 FP8 values share one scale; rope 32 × 2
    assert kvsize.index_key_bytes(a, "fp8") == 24 + 2


def test_kv_bytes_is_not_monotone_but_close():
    # the compressor state drops as a window closes: a context's bytes can be below its predecessor's, by at most
    # every compressor's unfinished window (~12 MB for Flash, what the planner's OS reserve absorbs)
    held = [kvsize.kv_bytes(FLASH, "fp8", n) for n in range(600)]
    drops = [a - b for a, b in zip(held, held[1:]) if b < a]
    assert drops and max(drops) <= 20 * 2 * 127 * 512 * 4 + 21 * 2 * 3 * (2 * 512 + 2 * 128) * 4


def test_unknown_format_and_negative_count():
    with pytest.raises(BadInput, match="unknown KV cache format 'int4'"):
        kvsize.bytes_per_token(FLASH, "int4")
    with pytest.raises(BadInput):
        kvsize.kv_bytes(FLASH, "bf16", -1)
