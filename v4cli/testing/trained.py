"""A tiny V4 checkpoint with *trained* weights, for measurements that random weights make meaningless.

On random weights the next-token distribution is nearly flat (top-1 and top-2 logits differ by a hair) and the
discrete choices inside the model (indexer top-k, expert routing) sit on knife edges, so any rounding — bf16 vs f32
KV, let alone fp8 — flips a large share of argmaxes. A trained model is confident where text is predictable, which
is what KV-format and weight-quantization agreement figures are about. We train transformers' reference model
(the golden oracle) briefly on this package's own source text and write the result back in the exact official
layout (FP8 + E8M0 128×128 scales, FP4 experts + 1×32 scales), so everything downstream (convert, engine,
llama.cpp) reads it like any official checkpoint.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import torch

from quant.official import FP4_VALUES, Checkpoint, dequantized
from quant.inventory import FP4_BLOCK
from v4cli.testing.golden import load_reference_model
from v4cli.testing.tiny import _e8m0, build_tensors, fp8_quantize, tiny_config, write_checkpoint


def fp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [out, in] → official FP4 (int8 [out, in/2], low nibble = element 2k) + E8M0 scale [out, in/32]."""
    out_f, in_f = w.shape
    blocks = w.float().view(out_f, in_f // FP4_BLOCK, FP4_BLOCK)
    exp = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp_min(1e-30) / 6.0))
    scaled = blocks / torch.exp2(exp)[..., None]
    mags = FP4_VALUES[:8]
    code = (scaled.abs()[..., None] - mags).abs().argmin(-1).to(torch.uint8)  # nearest magnitude
    code |= (scaled < 0).to(torch.uint8) << 3
    code = code.view(out_f, in_f)
    return (code[:, 0::2] | (code[:, 1::2] << 4)).view(torch.int8), _e8m0(exp)


def corpus_ids(tokenizer, limit: int | None = None) -> list[int]:
    """This package's Python sources, tokenized: real, always-present text (sorted for determinism)."""
    root = Path(__file__).resolve().parents[1]
    ids: list[int] = []
    for path in sorted(root.rglob("*.py")):
        ids += tokenizer.encode(path.read_text(errors="replace"), add_special_tokens=False).ids
        if limit and len(ids) >= limit:
            break
    return ids[:limit] if limit else ids


def _match_official(model, ckpt: Checkpoint) -> dict[str, tuple[str, int | None, slice | None]]:
    """official name → (transformers parameter, expert index, row slice), found by value.

    Random weights are unique, so each official tensor's exact dequantized value identifies the parameter (or the
    expert slice of a stacked parameter, or the w1/w3 half of gate_up) transformers loaded it into — no second copy
    of transformers' renaming rules to keep in sync.
    """
    pieces: dict[tuple, tuple[str, int | None, slice | None]] = {}

    def key(t: torch.Tensor) -> tuple:
        t = t.detach().float()
        return (tuple(t.shape), round(t.sum().item(), 3), round(t.flatten()[:8].sum().item(), 5))

    for pname, p in [*model.named_parameters(), *model.named_buffers()]:
        pieces[key(p)] = (pname, None, None)
        if p.dim() == 3:
            for e in range(p.shape[0]):
                pieces[key(p[e])] = (pname, e, None)
                half = p.shape[1] // 2
                for sl in (slice(0, half), slice(half, p.shape[1])):
                    pieces[key(p[e, sl])] = (pname, e, sl)
    found = {}
    for name in ckpt.tensors:
        if name.endswith(".scale") or name.startswith("mtp.") or ckpt.get(name).dtype == torch.int64:
            continue
        hit = pieces.get(key(dequantized(ckpt, name)))
        if hit is None:
            raise RuntimeError(f"no transformers parameter holds {name}")
        found[name] = hit
    return found


def train_tiny(out_dir: Path, preset: str = "tiny", steps: int = 150, seq: int = 256, batch: int = 2,
               lr: float = 3e-3, scored: int = 64, seed: int = 0, log=None, **overrides) -> Path:
    """Train the reference model from a random tiny checkpoint on `corpus_ids`, write an official checkpoint."""
    log = log or (lambda msg: print(msg, flush=True))
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    cfg = tiny_config(preset, **overrides)
    tensors = build_tensors(cfg, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        start = write_checkpoint(Path(tmp) / "random", cfg, tensors)
        ckpt = Checkpoint(start)
        model = load_reference_model(start)
        where = _match_official(model, ckpt)
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(start / "tokenizer.json"))
        ids = torch.tensor(corpus_ids(tok), dtype=torch.long)
    held_out = ids[-4096:]  # never trained on; eval scripts use it
    train = ids[:-4096]
    g = torch.Generator().manual_seed(seed)
    model.train()
    model.lm_head.weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    t0 = time.perf_counter()
    loss = None
    for step in range(steps):
        starts = torch.randint(0, train.numel() - seq - 1, (batch,), generator=g)
        x = torch.stack([train[s: s + seq] for s in starts.tolist()])
        for group in opt.param_groups:  # cosine decay: a short run still ends settled
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        # the 129K-row head dominates a tiny model's cost: score only the last `scored` positions (they see
        # the most compressed context), and keep the head frozen (random rows are already distinct targets)
        logits = model(input_ids=x, logits_to_keep=scored + 1, use_cache=False).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, -scored:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - t0:.0f}s")
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    trained = dict(tensors)
    with torch.no_grad():
        for name, (pname, e, sl) in where.items():
            v = params[pname].detach().float()
            v = v if e is None else v[e]
            v = v if sl is None else v[sl]
            dtype = tensors[name].dtype
            base = name.removesuffix(".weight")
            if dtype == torch.float8_e4m3fn:
                trained[name], trained[base + ".scale"] = fp8_quantize(v)
            elif dtype == torch.int8:
                trained[name], trained[base + ".scale"] = fp4_quantize(v)
            elif dtype == torch.bfloat16:
                trained[name] = v.to(torch.bfloat16)
            else:
                trained[name] = v.clone()
    tmp_out = out_dir.with_name(out_dir.name + ".partial")
    write_checkpoint(tmp_out, cfg, trained)
    torch.save(held_out.clone(), tmp_out / "held_out_ids.pt")
    (tmp_out / "training.json").write_text(json.dumps(
        {"steps": steps, "seq": seq, "batch": batch, "lr": lr, "scored": scored, "seed": seed, "final_loss": None if loss is None else loss.item(),
         "train_tokens": int(train.numel())}))
    tmp_out.replace(out_dir)  # complete only once renamed
    return out_dir

