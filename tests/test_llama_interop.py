"""llama.cpp (through llama-cpp-python) runs our `deepseek4` GGUFs: the f32 file gives transformers' golden logits,
the quantized files load, decode greedily and stay close to the f32 distribution.

llama.cpp runs in a subprocess (this file re-executed as a worker): a GGML_ASSERT aborts the whole process, and
must fail one test with its message rather than kill the pytest session.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp")

from v4cli.testing.golden import golden_logits
from v4cli.testing.tiny import (
    make_tiny_checkpoint,
    official_tokenizer_dir,
    random_token_ids,
)

pytestmark = [pytest.mark.llama, pytest.mark.slow]

PRESET = "tiny-128"  # llama.cpp accepts HCA ratio 128 only
N_PROMPT = 380  # crosses two HCA-128 windows in the prompt ...
N_GEN = 8  # ... and the third (position 383) while decoding one token at a time
N_CTX = 512
REL_TOL = 1e-3  # max |llama - golden| / max |golden|

# Measured on tiny-128 with this prompt: KL mean 0.0096 / 0.032 / 0.20 nats, top-1 0.79 / 0.53 / 0.12. The random
# model's next-token distribution is nearly flat (entropy 11.3 of 11.8 nats, median top-1/top-2 gap 0.16 for logit
# std 1), so small logit noise flips top-1; chance agreement would be ~1e-5, a broken layout gives ~0.
QUANT_LIMITS = {  # recipe → (max mean KL(f32 ‖ quant) in nats, min top-1 agreement with f32)
    "q8": (0.03, 0.6),
    "q4k": (0.1, 0.35),
    "q2k": (0.5, 0.05),
}


def _worker(args: dict) -> None:
    """Subprocess body: evaluate the prompt, decode greedily, save every position's logits and the new tokens."""
    import llama_cpp

    out = Path(args["out"])
    if args["mode"] == "tokenize":
        llm = llama_cpp.Llama(args["gguf"], vocab_only=True, verbose=False)
        ids = llm.tokenize(args["text"].encode(), add_bos=False, special=False)
        (out / "ids.json").write_text(json.dumps(ids))
        return
    ids = args["ids"]
    # No extra buffer types, as our llama engine loads: on AMX CPUs llama.cpp otherwise puts Q8_0/K-quant weights
    # in an AMX buffer that only its matmul can read, and aborts scheduling this model's other ops on them
    # (GGML_ASSERT(*cur_backend_id != -1)). `Llama()` has no argument for it, so its default params are wrapped.
    import llama_cpp.llama_cpp as low  # the module Llama() takes its defaults from

    defaults = low.llama_model_default_params

    def no_extra_bufts():
        p = defaults()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = no_extra_bufts
    # F32 caches and no flash attention: the exact path, comparable with transformers in fp32
    llm = llama_cpp.Llama(args["gguf"], n_ctx=N_CTX, n_batch=512, n_ubatch=512, logits_all=True, verbose=False,
                          type_k=0, type_v=0, flash_attn=False, swa_full=False, n_threads=2)
    llm.eval(ids)
    gen = []
    for _ in range(args["n_gen"]):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        gen.append(tok)
        llm.eval([tok])
    np.save(out / "logits.npy", np.asarray(llm.scores[: llm.n_tokens], dtype=np.float32))
    (out / "gen.json").write_text(json.dumps(gen))


def _run_worker(args: dict) -> None:
    r = subprocess.run([sys.executable, __file__, json.dumps(args)], capture_output=True, text=True, timeout=900,
                       check=False)  # a crash is reported below, with llama.cpp's own message
    if r.returncode != 0:
        asserts = [ln for ln in r.stderr.splitlines() if "GGML_ASSERT" in ln or "error" in ln.lower()]
        pytest.fail(f"llama.cpp worker exited {r.returncode} on {args['gguf']}:\n"
                    + "\n".join(asserts[:10] or r.stderr.splitlines()[-20:]))


@pytest.fixture(scope="module")
def ckpt128(tiny_dir) -> Path:
    # same folder as conftest's tiny_gguf factory uses, so the checkpoint is built once
    return make_tiny_checkpoint(tiny_dir / f"ckpt-{PRESET}", preset=PRESET)


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return random_token_ids(N_PROMPT, seed=1)


@pytest.fixture(scope="module")
def llama_run(ckpt128, tiny_gguf, prompt, tmp_path_factory):
    """Factory: llama_run(recipe) → (logits [N_PROMPT + N_GEN, vocab], greedy tokens), run once per recipe."""
    done: dict[str, tuple[np.ndarray, list[int]]] = {}

    def get(recipe: str):
        if recipe not in done:
            out = tmp_path_factory.mktemp(f"llama-{recipe}")
            _run_worker({"mode": "generate", "gguf": str(tiny_gguf(recipe, PRESET)), "ids": prompt,
                         "n_gen": N_GEN, "out": str(out)})
            logits = np.load(out / "logits.npy")
            (out / "logits.npy").unlink()  # ~200 MB
            done[recipe] = (logits, json.loads((out / "gen.json").read_text()))
        return done[recipe]

    return get


def test_f32_logits_equal_transformers_golden(ckpt128, prompt, llama_run):
    logits, gen = llama_run("f32")
    assert logits.shape == (N_PROMPT + N_GEN, 129280)
    # golden over prompt + generated tokens: checks the batched prompt and the one-token decode steps alike
    golden = golden_logits(ckpt128, prompt + gen).numpy()
    err = np.abs(logits - golden).max(axis=1) / np.abs(golden).max()
    print(f"\nllama.cpp f32 vs transformers: max rel err {err.max():.3g} (prompt {err[:N_PROMPT].max():.3g}, "
          f"decode {err[N_PROMPT:].max():.3g})")
    bad = np.nonzero(err > REL_TOL)[0]
    assert bad.size == 0, f"{bad.size} positions over {REL_TOL}, first {bad[:10].tolist()}, worst {err.max():.3g}"
    assert gen == golden[N_PROMPT - 1 : -1].argmax(axis=1).tolist()


def _kl_top1(ref: np.ndarray, other: np.ndarray) -> tuple[float, float, float]:
    """Mean and max per-position KL(ref ‖ other) in nats, and top-1 agreement."""
    p = torch.log_softmax(torch.from_numpy(ref).double(), dim=-1)
    q = torch.log_softmax(torch.from_numpy(other).double(), dim=-1)
    kl = (p.exp() * (p - q)).sum(dim=-1)
    top1 = (p.argmax(dim=-1) == q.argmax(dim=-1)).double().mean()
    return kl.mean().item(), kl.max().item(), top1.item()


@pytest.mark.parametrize("recipe", list(QUANT_LIMITS))
def test_quantized_file_generates_close_to_f32(recipe, llama_run):
    ref, _ = llama_run("f32")
    logits, gen = llama_run(recipe)
    assert logits.shape == ref.shape
    assert np.isfinite(logits).all()
    assert len(gen) == N_GEN and all(0 <= t < 129280 for t in gen)
    # greedy decode is consistent with the logits it produced (each token is the argmax of the previous row)
    assert gen == logits[N_PROMPT - 1 : -1].argmax(axis=1).tolist()
    # compare on the prompt only: after the first differing greedy token the two runs see different inputs
    kl_mean, kl_max, top1 = _kl_top1(ref[:N_PROMPT], logits[:N_PROMPT])
    print(f"\n{recipe}: KL(f32 ‖ {recipe}) mean {kl_mean:.4g} max {kl_max:.4g} nats, top-1 agreement {top1:.3f}")
    max_kl, min_top1 = QUANT_LIMITS[recipe]
    assert kl_mean < max_kl
    assert top1 > min_top1


def test_fewer_bits_drift_further(llama_run):
    ref, _ = llama_run("f32")
    kl = [_kl_top1(ref[:N_PROMPT], llama_run(r)[0][:N_PROMPT])[0] for r in ("q8", "q4k", "q2k")]
    assert kl == sorted(kl), f"KL q8/q4k/q2k = {kl}"


def test_llama_tokenizer_matches_official(tiny_gguf, tmp_path):
    from tokenizers import Tokenizer

    text = ("DeepSeek-V4 runs on llama.cpp; 量化后的模型 still speaks.\n"
            "def f(x):\n    return x ** 2  # 12345 67890\n\n  Ünïcödé — emoji 🚀 and tabs\tend")
    _run_worker({"mode": "tokenize", "gguf": str(tiny_gguf("q8", PRESET)), "text": text, "out": str(tmp_path)})
    ours = json.loads((tmp_path / "ids.json").read_text())
    official = Tokenizer.from_file(str(official_tokenizer_dir() / "tokenizer.json"))
    assert ours == official.encode(text, add_special_tokens=False).ids


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
