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


def test_flash_constant_part():
    # every compressor keeps kv + score buffers of coff·ratio slots × coff·dim in fp32 (DeepSeek's layout)
    csa, idx, hca = 2 * 8 * 1024 * 4, 2 * 8 * 256 * 4, 2 * 128 * 512 * 4
    assert kvsize.compressor_state_bytes(FLASH) == 21 * (csa + idx) + 20 * hca == 12_206_080  # "~12 MB"
    assert kvsize.window_bytes(FLASH, "bf16") == 43 * 128 * 512 * 2
    assert kvsize.kv_bytes(FLASH, "bf16", 0) == kvsize.constant_bytes(FLASH, "bf16")


def test_kv_bytes_counts_only_complete_windows():
    c = kvsize.constant_bytes(FLASH, "bf16")
    assert kvsize.kv_bytes(FLASH, "bf16", 3) == c  # no window of 4 closed yet
    assert kvsize.kv_bytes(FLASH, "bf16", 4) == c + 21 * (1024 + 256)
    assert kvsize.kv_bytes(FLASH, "bf16", 128) == c + 21 * 32 * 1280 + 20 * 1024
    n = 1 << 20  # a multiple of every ratio: exactly the per-token rate
    assert kvsize.kv_bytes(FLASH, "bf16", n) == c + 6880 * n
    assert round((kvsize.kv_bytes(FLASH, "bf16", n) - c) / 2**30, 2) == 6.72  # facts: 6.72 GiB at 1M


def test_against_a_direct_count_on_an_odd_schedule():
    cfg = copy.deepcopy(FLASH_CONFIG)
    cfg.update(num_hidden_layers=5, compress_ratios=[0, 4, 16, 4, 32, 0], head_dim=96, qk_rope_head_dim=32,
               index_head_dim=48, sliding_window=10)
    a = ModelArgs.from_config(cfg)
    for fmt in kvsize.KV_FORMATS:
        e, k = kvsize.entry_bytes(a, fmt), kvsize.index_key_bytes(a, fmt)
        for n in (0, 5, 63, 64, 1000):
            grown = sum((n // r) * (e + (k if r == 4 else 0)) for r in (4, 16, 4, 32))
            assert kvsize.kv_bytes(a, fmt, n) == kvsize.constant_bytes(a, fmt) + grown
    assert kvsize.entry_bytes(a, "fp8") == 64 + 1 + 64  # 64 FP8 values share one scale; rope 32 × 2
    assert kvsize.index_key_bytes(a, "fp8") == 24 + 2


def test_max_tokens_is_the_largest_fitting_context():
    budget = 10**9
    for fmt in kvsize.KV_FORMATS:
        n = kvsize.max_tokens(FLASH, fmt, budget)
        assert kvsize.kv_bytes(FLASH, fmt, n) <= budget < kvsize.kv_bytes(FLASH, fmt, n + 1)
    assert kvsize.max_tokens(FLASH, "fp8", 10**12) == FLASH.max_position_embeddings
    assert kvsize.max_tokens(FLASH, "bf16", 1000) == 0


def test_unknown_format_and_negative_count():
    with pytest.raises(BadInput, match="unknown KV cache format 'int4'"):
        kvsize.bytes_per_token(FLASH, "int4")
    with pytest.raises(BadInput):
        kvsize.kv_bytes(FLASH, "bf16", -1)
