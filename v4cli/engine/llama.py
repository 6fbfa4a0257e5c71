"""The llama.cpp engine: the same interface and records as the torch `Engine`, run by llama-cpp-python.

It drives llama.cpp's C API directly (llama-cpp-python's ctypes bindings) rather than the high-level `Llama`
class, because `Llama()` exposes neither tensor placement overrides nor `use_extra_bufts`. Token selection uses
our own `Sampler` over llama.cpp's logits, so both engines pick the same token from the same logits and a seed
means the same thing in both; copying one row of logits per token costs microseconds against a decode step.

One llama context holds one sequence, so one `LlamaCache` is live at a time; switching caches saves the other's
sequence state (`llama_state_seq_*`, which round-trips exactly) and restores it when it is used again.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quant import names as N
from v4cli.engine.detok import Detokenizer, StopMatcher, tokenizer_from_metadata
from v4cli.engine.generate import peak_rss_bytes
from v4cli.engine.options import RUN
from v4cli.engine.records import DoneRecord, Memory, Timings, TokenRecord
from v4cli.engine.sampling import Sampler, SamplingParams, token_logprobs
from quant.errors import BadInput, GGUFError, NotFoundError, V4Error
from v4cli.gguf_file import GGUFModel, open_gguf

INSTALL_HINT = "pip install llama-cpp-python==0.3.36 (a CPU build takes about 11 minutes on 2 cores)"
DEFAULT_N_CTX = 4096
MAX_BATCH = 512  # tokens per llama_decode call (also the logits buffer height)
CTX_GROWTH = 1024  # a grown context is rounded up to this, so a long eval does not recreate it per chunk


@dataclass(frozen=True)
class KVType:
    """How one of our KV formats maps onto llama.cpp's cache: ggml type of K and V, and whether it needs FA."""

    ggml_type: int
    flash_attn: bool
    note: str


# ggml type ids: F32 = 0, F16 = 1, Q8_0 = 8, BF16 = 30. llama.cpp's deepseek4 cache accepts BF16 with and without
# flash attention on CPU; without it the logits stay closer to f32 (measured 3.6e-3 vs 2e-1 max rel on tiny-128).
KV_TYPES: dict[str, KVType] = {
    "f32": KVType(0, False, "F32 K/V, no flash attention: the exact path"),
    "bf16": KVType(30, False, "BF16 K/V"),
    # llama.cpp has no FP8 cache type; Q8_0 is the nearest 8-bit one and quantized caches need flash attention
    "fp8": KVType(8, True, "no FP8 cache in llama.cpp: Q8_0 K/V with flash attention instead"),
}


def expert_override_patterns() -> list[str]:
    """Regexes (llama.cpp matches them with std::regex_search) selecting the routed-expert tensors."""
    return [re.escape(w) for w in N.EXPERTS.values()]


def _import_llama():
    try:
        import llama_cpp
        from llama_cpp import llama_cpp as lib
    except ImportError as e:  # also an OSError-wrapped missing shared library
        raise V4Error(f"the llama engine needs llama-cpp-python ({e})", hint=INSTALL_HINT) from None
    return llama_cpp, lib


class _Log:
    """Routes llama.cpp's log to memory: keeps the last error lines (for our error messages), drops the rest."""

    _installed = None
    lines: list[str] = []
    _lock = threading.Lock()

    @classmethod
    def install(cls, lib) -> None:
        if cls._installed is not None:
            return

        def cb(level, text, _user):
            if level in (2, 3):  # GGML_LOG_LEVEL_WARN, _ERROR
                with cls._lock:
                    cls.lines = (cls.lines + [text.decode("utf-8", "replace").rstrip()])[-20:]

        cls._installed = lib.llama_log_callback(cb)  # the ctypes thunk must outlive every call into llama.cpp
        lib.llama_log_set(cls._installed, ctypes.c_void_p(0))

    @classmethod
    def last(cls) -> str:
        with cls._lock:
            return next((ln for ln in reversed(cls.lines) if ln), "")


class _BuftOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }"""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _cpu_buffer_type() -> int:
    """ggml's host (CPU) buffer type, looked up through the backend registry."""
    from llama_cpp._ggml import libggml

    libggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    libggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    libggml.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    libggml.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    dev = libggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not dev:
        raise V4Error("llama.cpp has no CPU backend device", hint=INSTALL_HINT)
    return libggml.ggml_backend_dev_buffer_type(dev)


def build_overrides(patterns: list[str], buft: int) -> ctypes.Array:
    """A NULL-terminated llama_model_tensor_buft_override array placing tensors matching `patterns` in `buft`."""
    arr = (_BuftOverride * (len(patterns) + 1))()
    for i, p in enumerate(patterns):
        arr[i].pattern = p.encode()
        arr[i].buft = buft
    return arr  # the last element stays zeroed: the terminator


class LlamaCache:
    """One sequence's state in a LlamaEngine. `pos` tokens fed so far; the state lives in llama's context."""

    def __init__(self, engine: LlamaEngine):
        self.engine = engine
        self.pos = 0
        self._saved: bytes | None = None  # the sequence state while another cache owns the context

    def nbytes(self) -> int:
        """Bytes of this sequence's llama.cpp state (compressed entries, windows, compressor state)."""
        if self.engine._owner is self:
            return self.engine._seq_state_size()
        return len(self._saved or b"")

    def to_bytes(self) -> bytes:
        if self.engine._owner is self:
            return self.engine._seq_state_get()
        return self._saved or b""

    def load_bytes(self, data: bytes, n_tokens: int | None = None) -> None:
        """Take `to_bytes` output of a cache of this engine, the state after `n_tokens` tokens. llama.cpp checks the
        bytes when this cache next owns the context (`llama_state_seq_set_data`); here only what it cannot."""
        from v4cli.model.cache import BadState

        if n_tokens is None or n_tokens < 0:
            raise BadState("a llama.cpp sequence state needs its token count")
        if not isinstance(data, (bytes, bytearray)) or (n_tokens > 0 and not data):
            raise BadState(f"no llama.cpp sequence state for {n_tokens} tokens")
        if self.engine._owner is self:
            self.engine._owner = None  # the context holds our old state: _activate must load the new one
        self._saved, self.pos = bytes(data), n_tokens


class LlamaEngine:
    """llama.cpp behind the torch Engine's interface: tokenizer, args, new_cache, prefill, logits, generate."""

    def __init__(self, path: Path, gf: GGUFModel, model, lib, kv_format: str, n_threads: int, n_ctx: int,
                 overrides, cpu_buft: int, flash_attn: bool | None = None):
        self.path, self.source, self.lib, self.model = path, gf, lib, model
        self.args = gf.args
        self.tokenizer = tokenizer_from_metadata(gf.metadata)
        self.kv_format, self.kv = kv_format, KV_TYPES[kv_format]
        self.flash_attn = self.kv.flash_attn if flash_attn is None else flash_attn
        self.n_threads, self.n_ctx = n_threads, n_ctx
        self._overrides, self.cpu_buft = overrides, cpu_buft  # llama.cpp keeps pointers into the overrides
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        self.ctx = None
        self._batch = None
        self._owner: LlamaCache | None = None
        self._make_context(n_ctx)

    @classmethod
    def load(cls, gguf_path: str | Path, kv_format: str = RUN.kv_format, n_threads: int | None = None,
             n_ctx: int = DEFAULT_N_CTX, flash_attn: bool | None = None, experts_on_cpu: bool = True,
             n_gpu_layers: int = 0) -> LlamaEngine:
        """Load a deepseek4 GGUF into llama.cpp; `n_ctx` grows on demand for a fresh cache."""
        if kv_format not in KV_TYPES:
            raise BadInput(f"unknown kv format {kv_format!r}", hint=f"use one of {', '.join(KV_TYPES)}")
        path = Path(gguf_path)
        if not path.exists():
            raise NotFoundError(f"{path}: no such model file")
        gf = open_gguf(path)  # our reader validates first: a bad file must not reach a GGML_ASSERT abort
        # llama.cpp finds a split set's other parts itself, from the first part's name
        path = gf.path
        args = gf.validate_deepseek4()
        _, lib = _import_llama()
        _Log.install(lib)
        lib.llama_backend_init()
        n_threads = n_threads or os.cpu_count() or 1
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        # on CPU, llama.cpp would copy MXFP4 experts out of the mmap into a repacked buffer: ~147 GB for Flash
        mp.use_extra_bufts = False
        cpu_buft = _cpu_buffer_type()
        overrides = build_overrides(expert_override_patterns(), cpu_buft) if experts_on_cpu else None
        if overrides is not None:
            mp.tensor_buft_overrides = ctypes.addressof(overrides)
        _Log.lines = []
        model = lib.llama_model_load_from_file(str(path).encode(), mp)
        if not model:
            raise GGUFError(f"{path}: llama.cpp could not load it: {_Log.last() or 'no reason given'}",
                            hint="check it with v4 info, or convert it again with v4 quantize")
        n_ctx = min(max(n_ctx, 1), args.max_position_embeddings)
        try:
            return cls(path, gf, model, lib, kv_format, n_threads, n_ctx, overrides, cpu_buft, flash_attn)
        except BaseException:
            lib.llama_model_free(model)
            raise

    # ---- context and sequence-state management ----
    def _make_context(self, n_ctx: int) -> None:
        lib = self.lib
        self._free_context()
        cp = lib.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = min(MAX_BATCH, n_ctx)
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = self.n_threads
        cp.type_k = cp.type_v = self.kv.ggml_type
        cp.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn
                              else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cp.swa_full = False  # a full-size window cache would be 43 GiB at 1M context
        cp.no_perf = True
        _Log.lines = []
        ctx = lib.llama_init_from_model(self.model, cp)
        if not ctx:
            raise GGUFError(f"{self.path}: llama.cpp could not create a {n_ctx}-token context with "
                            f"{self.kv_format} KV: {_Log.last() or 'no reason given'}",
                            hint="try another --kv or a shorter --ctx")
        self.ctx, self.n_ctx, self.n_batch = ctx, lib.llama_n_ctx(ctx), cp.n_batch
        self._batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self._owner = None

    def _free_context(self) -> None:
        if self._batch is not None:
            self.lib.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx is not None:
            self.lib.llama_free(self.ctx)
            self.ctx = None

    def close(self) -> None:
        """Free the context and the model (the engine is unusable afterwards)."""
        self._free_context()
        if self.model is not None:
            self.lib.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        if getattr(self, "lib", None) is not None:
            self.close()

    def _memory(self):
        return self.lib.llama_get_memory(self.ctx)

    def _seq_state_size(self) -> int:
        return int(self.lib.llama_state_seq_get_size(self.ctx, 0))

    def _seq_state_get(self) -> bytes:
        n = self._seq_state_size()
        buf = (ctypes.c_uint8 * n)()
        got = self.lib.llama_state_seq_get_data(self.ctx, buf, n, 0)
        return bytes(buf[:got])

    def _activate(self, cache: LlamaCache, need: int) -> None:
        """Make `cache` own the context, with room for `need` positions in total."""
        if self._owner is not cache:
            if self._owner is not None and self._owner.pos:
                self._owner._saved = self._seq_state_get()
            self.lib.llama_memory_clear(self._memory(), True)
            self._owner = None
            if cache._saved:
                buf = (ctypes.c_uint8 * len(cache._saved)).from_buffer_copy(cache._saved)
                if self.lib.llama_state_seq_set_data(self.ctx, buf, len(cache._saved), 0) != len(cache._saved):
                    raise V4Error("llama.cpp refused to restore a saved sequence state")
                cache._saved = None
            self._owner = cache
        if need > self.n_ctx:
            limit = self.args.max_position_embeddings
            if need > limit:
                raise BadInput(f"{need} tokens exceed the model's context of {limit}")
            if cache.pos:
                raise BadInput(f"{need} tokens exceed the llama context of {self.n_ctx}",
                               hint="load the llama engine with a larger n_ctx")
            self._make_context(min(limit, -(-need // CTX_GROWTH) * CTX_GROWTH))
            self._owner = cache

    def new_cache(self) -> LlamaCache:
        return LlamaCache(self)

    def _ids(self, ids) -> list[int]:
        ids = [int(i) for i in torch.as_tensor(ids, dtype=torch.long).reshape(-1).tolist()]
        if ids and (min(ids) < 0 or max(ids) >= self.args.vocab_size):
            raise BadInput(f"token ids must be in [0, {self.args.vocab_size})")
        return ids

    def _decode(self, cache: LlamaCache, ids: list[int], all_logits: bool) -> torch.Tensor:
        """Feed ids at cache.pos in batches; → f32 logits [len(ids) or 1, vocab] (all rows or the last)."""
        lib, b = self.lib, self._batch
        rows = []
        for s in range(0, len(ids), self.n_batch):
            part = ids[s: s + self.n_batch]
            b.n_tokens = len(part)
            for i, tok in enumerate(part):
                b.token[i], b.pos[i], b.n_seq_id[i] = tok, cache.pos + i, 1
                b.seq_id[i][0] = 0
                b.logits[i] = all_logits
            b.logits[len(part) - 1] = True
            rc = lib.llama_decode(self.ctx, b)
            if rc != 0:
                raise V4Error(f"llama_decode failed ({rc}) at position {cache.pos}: {_Log.last() or 'no reason'}")
            cache.pos += len(part)
            n_out = len(part) if all_logits else 1
            if all_logits or s + self.n_batch >= len(ids):
                out = np.ctypeslib.as_array(lib.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))
                rows.append(torch.from_numpy(out.copy()))  # llama reuses the buffer on the next decode
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    # ---- the Engine interface ----
    def prefill(self, ids, cache: LlamaCache, chunk: int = RUN.chunk) -> torch.Tensor:
        """Feed ids into cache; → logits [vocab] after the last one. (`chunk` is accepted for parity.)"""
        ids = self._ids(ids)
        if not ids:
            raise BadInput("nothing to prefill: the prompt is empty")
        self._activate(cache, cache.pos + len(ids))
        return self._decode(cache, ids, all_logits=False)[-1]

    def iter_logits(self, ids, chunk: int = RUN.chunk, cache: LlamaCache | None = None) -> Iterator[torch.Tensor]:
        """Logits for every position, one [len(chunk), vocab] block per chunk."""
        ids = self._ids(ids)
        cache = cache if cache is not None else self.new_cache()
        self._activate(cache, cache.pos + len(ids))
        for i in range(0, len(ids), chunk):
            self._activate(cache, cache.pos + len(ids) - i)
            yield self._decode(cache, ids[i: i + chunk], all_logits=True)

    def logits(self, ids, chunk: int = RUN.chunk) -> torch.Tensor:
        """f32 logits [T, vocab] for one sequence from a fresh cache."""
        return torch.cat(list(self.iter_logits(ids, chunk)))

    def generate(self, prompt_ids, sampling: SamplingParams = SamplingParams(), cache: LlamaCache | None = None,
                 chunk: int = RUN.chunk, constraint=None, logprobs: int | None = None
                 ) -> Iterator[TokenRecord | DoneRecord]:
        """Prefill the prompt, then sample up to max_tokens: the same records, timings, `constraint` and `logprobs`
        as `Engine.generate` (the grammar mask and logprobs work on llama.cpp's logits the same way)."""
        t0 = time.perf_counter()
        cache = cache if cache is not None else self.new_cache()
        prompt = self._ids(prompt_ids)
        timings = Timings(prompt_tokens=len(prompt))
        sampler = Sampler(sampling)
        detok = Detokenizer(self.tokenizer, prompt)
        stopper = StopMatcher(sampling.stop)
        if constraint is not None:
            constraint.start(sampling.max_tokens)
        reason, cut = "length", False
        if sampling.max_tokens:
            # room for the prompt and every token fed back, checked before any work is done
            self._activate(cache, cache.pos + len(prompt) + sampling.max_tokens - 1)
        logits = self.prefill(prompt, cache, chunk) if sampling.max_tokens else None
        timings.prefill_s = time.perf_counter() - t0
        t_dec = t0
        for n in range(sampling.max_tokens):
            tok = int(sampler(logits, constraint.mask() if constraint is not None else None))
            if n == 0:
                t_dec = time.perf_counter()
                timings.ttft_s = t_dec - t0
            timings.decode_tokens = n
            if sampling.stop_on_eos and tok == self.args.eos_token_id:
                reason = "eos"
                break
            if constraint is not None:
                constraint.advance(tok)
            text, cut = stopper.push(detok.add(tok))
            lp, top = token_logprobs(logits, tok, logprobs) if logprobs is not None else (None, ())
            yield TokenRecord(tok, text, logprob=lp, top=top)
            if cut or (constraint is not None and constraint.done):
                reason = "stop"
                break
            if n + 1 < sampling.max_tokens:
                self._activate(cache, cache.pos + 1)  # the consumer may have used another cache in between
                logits = self._decode(cache, [tok], all_logits=False)[-1]
        timings.decode_s = time.perf_counter() - t_dec if timings.decode_tokens else 0.0
        tail = ""
        if not cut:
            tail, _ = stopper.push(detok.flush())
            tail += stopper.flush()
        yield DoneRecord(reason, tail, timings, Memory(peak_rss_bytes(), cache.nbytes()), stopper.matched)
