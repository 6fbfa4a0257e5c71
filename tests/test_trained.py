"""The trained tiny checkpoint's plumbing: official FP4 quantization, and the value-matched mapping that writes
transformers' parameters back under their official names (checked with zero training steps)."""

from __future__ import annotations

import torch

from quant.official import Checkpoint, dequant_fp4, dequantized
from v4cli.testing.tiny import fp4_random
from v4cli.testing.trained import fp4_quantize, train_tiny


def test_fp4_quantize_represents_fp4_values_exactly():
    g = torch.Generator().manual_seed(0)
    packed, scale = fp4_random(8, 64, 0.05, g)
    w = dequant_fp4(packed, scale)
    assert torch.equal(dequant_fp4(*fp4_quantize(w)), w)


def test_fp4_quantize_rounds_to_nearest():
    w = torch.tensor([[0.2, -0.74, 2.6, 5.9] * 8])  # block max 5.9 → scale 1: .2→0, .74→.5, 2.6→3 (ties away), 5.9→6
    got = dequant_fp4(*fp4_quantize(w))[0, :4]
    assert got.tolist() == [0.0, -0.5, 3.0, 6.0]


def test_zero_steps_writes_back_the_same_model(tmp_path):
    out = train_tiny(tmp_path / "t0", steps=0, log=lambda m: None)
    start = Checkpoint(out)
    from v4cli.testing.tiny import build_tensors, tiny_config, write_checkpoint

    cfg = tiny_config("tiny")
    ref = Checkpoint(write_checkpoint(tmp_path / "ref", cfg, build_tensors(cfg, seed=0)))
    assert set(start.tensors) == set(ref.tensors)
    for name in ref.tensors:
        if name.endswith(".scale"):
            continue
        a, b = dequantized(start, name).float(), dequantized(ref, name).float()
        # FP8 re-quantization of an FP8 value can pick a smaller block exponent: equal within one e4m3 step
        assert torch.allclose(a, b, rtol=0.07, atol=0), name
    assert (out / "held_out_ids.pt").exists() and not (tmp_path / "t0.partial").exists()
