"""The Engine: prefill in chunks, decode token by token, stream typed records.

The decode loop's only host sync is reading the sampled token id to yield it. no_grad (not inference_mode):
caches outlive a call and are updated in place by later ones.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from v4cli.engine import cuda_graphs
from v4cli.engine.detok import Detokenizer, StopMatcher, tokenizer_from_metadata
from v4cli.engine.loader import load_model, load_mtp
from v4cli.engine.options import RUN
from v4cli.engine.records import DoneRecord, Memory, Timings, TokenRecord
from v4cli.engine.sampling import Sampler, SamplingParams, token_logprobs
from quant.errors import BadInput
from v4cli.model.cache import KV_FORMATS, ModelCache
from v4cli.model.deepseek4 import MTP, DeepseekV4

if TYPE_CHECKING:
    from v4cli.engine.grammar import TokenConstraint



def peak_rss_bytes() -> int:
    """This process's peak resident set. VmHWM first: getrusage's ru_maxrss survives execve, so a worker
    forked from a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Engine:
    """A loaded model plus its tokenizer; makes caches in one KV storage format."""

    def __init__(self, model: DeepseekV4, tokenizer=None, kv_format: str = RUN.kv_format, device: str = RUN.device,
                 source=None, mtp: MTP | None = None, ctx: int | None = None):
        if kv_format not in KV_FORMATS:
            raise BadInput(f"unknown kv format {kv_format!r}", hint=f"use one of {', '.join(KV_FORMATS)}")
        self.model, self.tokenizer, self.kv_format = model, tokenizer, kv_format
        self.device = torch.device(device)
        self.source = source  # the open GGUFFile(s), kept alive for the mmap views
        self.mtp = mtp  # the MTP draft head, when a draft file was loaded
        self.ctx = ctx  # the context it was planned for: caches reserve its entries (None: they grow as needed)

    @classmethod
    def load(cls, gguf_path: str | Path, kv_format: str = RUN.kv_format, device: str = RUN.device,
             mtp: str | Path | None = None, ctx: int | None = None, gpu_mem: int | None = None) -> "Engine":
        """Load a GGUF; `mtp`: also llama.cpp's separate MTP draft file for it (`v4 quantize --mtp`). On a GPU the
        placement plan for a `ctx`-token cache and `gpu_mem` bytes (None: what is free) decides what goes there;
        the rest stays in host memory (v4cli/engine/loader.py)."""
        model, gf = load_model(gguf_path, device, ctx=ctx, kv_format=kv_format, gpu_mem=gpu_mem)
        draft, sources = None, gf
        if mtp is not None:
            draft, mgf = load_mtp(model, mtp)
            sources = (gf, mgf)
        if torch.device(device).type == "cuda" and os.environ.get("V4_CUDA_GRAPHS", "1") != "0":
            cuda_graphs.enable(model, draft)  # V4_CUDA_GRAPHS=0: every launch eager (debugging, profiling)
        # token ids and logits live with the head (placed first, so on the GPU whenever anything is)
        return cls(model, tokenizer_from_metadata(gf.metadata), kv_format, model.head.device, source=sources,
                   mtp=draft, ctx=ctx)

    @property
    def args(self):
        return self.model.args

    def new_cache(self) -> ModelCache:
        return self.model.make_cache(self.kv_format, self.ctx)

    def _ids(self, ids) -> torch.Tensor:
        t = torch.as_tensor(ids, dtype=torch.long).reshape(-1).to(self.device)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.args.vocab_size):
            raise BadInput(f"token ids must be in [0, {self.args.vocab_size})")
        return t

    @torch.no_grad()
    def prefill(self, ids, cache: ModelCache, chunk: int = RUN.chunk) -> torch.Tensor:
        """Feed ids (in chunks of `chunk`) into cache; → logits [vocab] after the last one."""
        ids = self._ids(ids)
        if ids.numel() == 0:
            raise BadInput("nothing to prefill: the prompt is empty")
        for i in range(0, ids.numel(), chunk):
            logits = self.model.forward(ids[i: i + chunk], cache, last_only=True)
        return logits[-1]

    @torch.no_grad()
    def iter_logits(self, ids, chunk: int = RUN.chunk, cache: ModelCache | None = None) -> Iterator[torch.Tensor]:
        """Logits for every position, one [len(chunk), vocab] block per chunk (for eval without holding T×V)."""
        ids = self._ids(ids)
        cache = cache if cache is not None else self.new_cache()
        for i in range(0, ids.numel(), chunk):
            yield self.model.forward(ids[i: i + chunk], cache)

    @torch.no_grad()
    def iter_draft_logits(self, ids, chunk: int = RUN.chunk) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(trunk logits, MTP draft logits) per chunk, both [len(chunk), vocab]: at position p both predict x_{p+1},
        the trunk from all of x_0..x_p, the draft from the trunk's streams at p − 1 and x_p (what a speculative
        decoder has before running the trunk at p). Needs an engine loaded with `mtp=`."""
        if self.mtp is None:
            raise BadInput("no MTP draft loaded", hint="load the engine with an MTP file (v4 eval --mtp FILE)")
        ids = self._ids(ids)
        cache, draft_cache = self.new_cache(), self.mtp.make_cache(self.kv_format)
        prev = None
        for i in range(0, ids.numel(), chunk):
            part = ids[i: i + chunk]
            X = self.model.streams(part, cache)
            if prev is None:  # the draft at position 0 has no trunk state before it (llama.cpp uses zeros)
                prev = torch.zeros_like(X[:1])
            yield self.model.head_logits(X), self.mtp.forward(torch.cat([prev, X[:-1]]), part, draft_cache)
            prev = X[-1:]

    def logits(self, ids, chunk: int = RUN.chunk) -> torch.Tensor:
        """f32 logits [T, vocab] for one sequence from a fresh cache."""
        return torch.cat(list(self.iter_logits(ids, chunk)))

    @torch.no_grad()
    def generate(self, prompt_ids, sampling: SamplingParams = SamplingParams(), cache: ModelCache | None = None,
                 chunk: int = RUN.chunk, constraint: "TokenConstraint | None" = None,
                 logprobs: int | None = None) -> Iterator[TokenRecord | DoneRecord]:
        """Prefill the prompt (into `cache`, which may already hold a prefix), then sample up to max_tokens.

        Yields a TokenRecord per token and one DoneRecord at the end. The cache is left holding
        prompt + generated tokens (except the final sampled token, which was never fed back).
        `constraint` (v4cli/engine/grammar.py): only tokens its grammar allows are sampled, and generation ends
        ("stop") as soon as the grammar is complete. `logprobs` N: each record carries the token's logprob and the
        N most likely alternatives (nothing is computed when None).
        """
        t0 = time.perf_counter()
        cache = cache if cache is not None else self.new_cache()
        prompt = self._ids(prompt_ids)
        timings = Timings(prompt_tokens=prompt.numel())
        sampler = Sampler(sampling, self.device)
        detok = Detokenizer(self.tokenizer, prompt.tolist()) if self.tokenizer is not None else None
        stopper = StopMatcher(sampling.stop)
        if constraint is not None:
            constraint.start(sampling.max_tokens)
        reason, cut = "length", False  # cut: a stop string ended the text (whatever is held back is dropped)
        logits = self.prefill(prompt, cache, chunk) if sampling.max_tokens else None
        timings.prefill_s = time.perf_counter() - t0
        t_dec = t0
        for n in range(sampling.max_tokens):
            allowed = constraint.mask().to(self.device, non_blocking=True) if constraint is not None else None
            tok_t = sampler(logits, allowed)
            tok = int(tok_t)  # the one host sync per token
            if n == 0:
                t_dec = time.perf_counter()
                timings.ttft_s = t_dec - t0
            timings.decode_tokens = n  # forward passes after the first token
            if sampling.stop_on_eos and tok == self.args.eos_token_id:
                reason = "eos"
                break
            if constraint is not None:
                constraint.advance(tok)
            text = detok.add(tok) if detok else ""
            text, cut = stopper.push(text)
            lp, top = token_logprobs(logits, tok, logprobs) if logprobs is not None else (None, ())
            yield TokenRecord(tok, text, logprob=lp, top=top)
            if cut or (constraint is not None and constraint.done):
                # a complete grammar allows nothing but EOS: end here rather than spend a forward pass on it
                reason = "stop"
                break
            if n + 1 < sampling.max_tokens:
                logits = self.model.forward(tok_t.view(1), cache, last_only=True)[-1]
        timings.decode_s = time.perf_counter() - t_dec if timings.decode_tokens else 0.0
        tail = ""
        if not cut:
            tail, _ = stopper.push(detok.flush() if detok else "")
            tail += stopper.flush()
        yield DoneRecord(reason, tail, timings, Memory(peak_rss_bytes(), cache.nbytes()), stopper.matched)
