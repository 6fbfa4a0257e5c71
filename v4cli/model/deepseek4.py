"""DeepSeek-V4 forward pass (facts §4), written against transformers' `deepseek_v4` as the executable spec.

The model knows nothing of quantization: weights are `QWeight`s looked up by GGUF name (through quant/names.py)
and every projection goes through `kernels.linear.linear`. Of devices it knows only that each layer runs where the
loader put its weights (the streams follow it): the fused one-token halves and routed experts left in host memory
are swapped in after it is built (v4cli/engine/specialize.py). Small tensors (norms, mHC mixers, sinks, ape, router
bias) are read once as f32. All state lives in the cache from `make_cache()`, so a prompt can be fed in chunks of
any size and decoding continues exactly.

Shapes: T = tokens in this call, H = heads, d = head_dim, r = rope dims, N = compressed entries, S = hc streams.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F

from kernels.attention import index_scores
from kernels.linear import QWeight, embedding, grouped_experts, linear, linear_many, routed_experts, swiglu
from kernels.mhc import MixerParams, hc_collapse, hc_post, hc_pre
from kernels.norm import rms_norm
from quant import names
from quant.config import ModelArgs
from quant.errors import GGUFError
from v4cli.model.cache import CompressorState, LayerCache, ModelCache, Rows, codecs
from v4cli.model.kvsize import DEFAULT_KV_FORMAT


class Rope:
    """Interleaved-pair RoPE on the trailing `dim` channels; YaRN-scaled frequencies for compressed layers."""

    def __init__(self, dim: int, theta: float, yarn: ModelArgs | None = None):
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        if yarn is not None:
            # YaRN frequency blend (no attention mscale: DeepSeek's reference does not scale cos/sin)
            def corr(rot):
                return dim * math.log(yarn.rope_original_max_position / (rot * 2 * math.pi)) / (2 * math.log(theta))

            low = max(math.floor(corr(yarn.beta_fast)), 0)
            high = min(math.ceil(corr(yarn.beta_slow)), dim - 1)
            if low == high:
                high += 0.001
            ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
            extra = 1 - ramp
            inv = inv / yarn.rope_factor * (1 - extra) + inv * extra
        self.dim, self.inv_freq = dim, inv
        self._inv_on: dict[torch.device, torch.Tensor] = {inv.device: inv}

    def cos_sin(self, pos: torch.Tensor) -> torch.Tensor:
        """The rotations at positions pos [T]: cos + i·sin per frequency, complex64 [T, dim/2]."""
        inv = self._inv_on.get(pos.device)
        if inv is None:  # copied once per device: a CUDA graph may not capture a host-to-device copy
            inv = self._inv_on[pos.device] = self.inv_freq.to(pos.device)
        f = pos.float()[:, None] * inv  # (T, dim/2)
        return torch.polar(torch.ones_like(f), f)

    def apply(self, x: torch.Tensor, cs: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Rotate the last `dim` channels of x [T, ..., D] at the rows' positions (inverse: rotate back).

        Each interleaved pair (a, b) is the complex a + ib times cos + i·sin: (a·cos − b·sin, b·cos + a·sin).
        One copy and one complex multiply in place, where slicing, four products and a stack/cat cost ~10 ops."""
        rot = cs.conj() if inverse else cs
        out = x.clone(memory_format=torch.contiguous_format)
        pairs = torch.view_as_complex(out[..., -self.dim:].unflatten(-1, (-1, 2)))
        pairs.mul_(rot.view((x.shape[0],) + (1,) * (x.dim() - 2) + (rot.shape[-1],)))
        return out


class Weights:
    """GGUF tensors by name: QWeights for projections, f32 tensors (read once) for the small ones."""

    def __init__(self, tensors: Mapping[str, QWeight]):
        self.tensors = tensors

    def q(self, name: str) -> QWeight:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"tensor {name} is missing from the model file") from None

    def f32(self, name: str) -> torch.Tensor:
        return self.q(name).dense()

    def has(self, name: str) -> bool:
        return name in self.tensors


class HyperConnection:
    """mHC mixer: from the S streams compute pre (collapse), post (expand) and comb (Sinkhorn-mixed residual)."""

    def __init__(self, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, args: ModelArgs):
        self.p = MixerParams(fn, scale, base, args.hc_mult, args.hc_sinkhorn_iters, args.hc_eps, args.rms_norm_eps)

    def pre(self, X: torch.Tensor):
        """X [T, S, D] → (block input [T, D], post [T, S], comb [T, S, S])."""
        return hc_pre(X, self.p)

    @staticmethod
    def post(y: torch.Tensor, X: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """X'[k] = post[k]·y + Σ_j comb[j,k]·X[j]."""
        return hc_post(y, X, post, comb)


class Compressor:
    """Softmax-gated pooling of `ratio` tokens into one entry; `overlap` (CSA) pools prev Ca + this Cb (2·ratio)."""

    def __init__(self, w: Weights, layer: int, prefix: str, dim: int, ratio: int, rope: Rope, eps: float):
        kv, gate, ape, norm = (f"{prefix}.{s}" for s in ("wkv.weight", "wgate.weight", "ape", "norm.weight"))
        self.wkv, self.wgate = w.q(names.blk(layer, kv)), w.q(names.blk(layer, gate))
        self.ape, self.norm = w.f32(names.blk(layer, ape)), w.f32(names.blk(layer, norm))
        self.dim, self.ratio, self.rope, self.eps = dim, ratio, rope, eps
        self.overlap = ratio == 4

    def update(self, st: CompressorState, x: torch.Tensor) -> None:
        """Feed x [T, D]; every window it completes becomes one stored entry."""
        m, d = self.ratio, self.dim
        kv, score = linear_many([(x, self.wkv), (x, self.wgate)])  # (T, width) each, width = 2d if overlap else d
        if st.buf_kv is not None:
            kv, score = torch.cat([st.buf_kv, kv]), torch.cat([st.buf_score, score])
        usable = kv.shape[0] // m * m
        if usable == 0:  # no window completes (most decode steps): these fresh rows are the buffer as they are
            st.buf_kv, st.buf_score = kv, score
            return
        st.buf_kv, st.buf_score = kv[usable:].clone(), score[usable:].clone()
        n = usable // m
        ck = kv[:usable].view(n, m, -1)
        cs = score[:usable].view(n, m, -1) + self.ape
        if self.overlap:
            pk = ck.new_zeros(n, 2 * m, d)
            ps = cs.new_full((n, 2 * m, d), float("-inf"))
            pk[:, m:], ps[:, m:] = ck[..., d:], cs[..., d:]  # this window's Cb
            pk[1:, :m], ps[1:, :m] = ck[:-1, :, :d], cs[:-1, :, :d]  # previous window's Ca
            if st.prev_kv is not None:
                pk[0, :m], ps[0, :m] = st.prev_kv, st.prev_score
            st.prev_kv, st.prev_score = ck[-1, :, :d].clone(), cs[-1, :, :d].clone()
            ck, cs = pk, ps
        entries = rms_norm((ck * torch.softmax(cs, dim=1)).sum(1), self.norm, self.eps)  # (n, d)
        pos = (torch.arange(n, device=x.device) + st.count) * m
        entries = self.rope.apply(entries, self.rope.cos_sin(pos))
        st.entries.append(entries)
        st.count += n


class Indexer:
    """Lightning indexer: picks, per query, the top-k visible CSA entries."""

    def __init__(self, w: Weights, layer: int, args: ModelArgs, rope: Rope):
        self.wq_b = w.q(names.blk(layer, "attn.indexer.wq_b.weight"))
        self.proj = w.q(names.blk(layer, "attn.indexer.weights_proj.weight"))
        self.compressor = Compressor(w, layer, "attn.indexer.compressor", args.index_head_dim, 4, rope,
                                     args.rms_norm_eps)
        self.H, self.d, self.topk, self.rope = args.index_n_heads, args.index_head_dim, args.index_topk, rope

    def select(self, st: CompressorState, x, qr, cs, pos) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (indices [T, k], valid [T, k]) of the chosen entries; k = min(topk, entries)."""
        self.compressor.update(st, x)
        keys = st.entries.stored()  # (N, di), f32 or bf16 as stored
        T, N = x.shape[0], keys.shape[0]
        if N == 0:
            return (torch.zeros(T, 0, dtype=torch.long, device=x.device),
                    torch.zeros(T, 0, dtype=torch.bool, device=x.device))
        q, w = linear_many([(qr, self.wq_b), (x, self.proj)])
        q = self.rope.apply(q.view(T, self.H, self.d), cs)  # (T, Hi, di)
        w = w * self.H ** -0.5  # (T, Hi)
        score = index_scores(q, w, keys, self.d ** -0.5)  # (T, N)
        visible = (pos + 1) // 4  # entries 0..visible-1 are complete for query t
        future = torch.arange(N, device=x.device)[None, :] >= visible[:, None]
        # a stable sort breaks score ties toward the older entry, so the choice never depends on chunking
        order = torch.sort(score.masked_fill(future, float("-inf")), dim=-1, descending=True, stable=True).indices
        idx = order[:, : min(self.topk, N)]
        return idx, idx < visible[:, None]


class Attention:
    """Shared-KV MQA with sinks over a sliding window plus (CSA/HCA) compressed entries; grouped output."""

    def __init__(self, w: Weights, layer: int, args: ModelArgs, ropes: dict[str, Rope]):
        b = lambda s: names.blk(layer, s)  # noqa: E731
        self.wq_a, self.wq_b, self.wkv = w.q(b("attn.wq_a.weight")), w.q(b("attn.wq_b.weight")), w.q(b("attn.wkv.weight"))
        self.wo_a, self.wo_b = w.q(b("attn.wo_a.weight")), w.q(b("attn.wo_b.weight"))
        self.q_norm, self.kv_norm = w.f32(b("attn.q_norm.weight")), w.f32(b("attn.kv_norm.weight"))
        self.sink = w.f32(b("attn.attn_sink"))
        self.ratio = args.compress_ratios[layer]
        self.rope = ropes["main"] if self.ratio == 0 else ropes["compress"]
        self.compressor = None
        if self.ratio:
            self.compressor = Compressor(w, layer, "attn.compressor", args.head_dim, self.ratio, self.rope,
                                         args.rms_norm_eps)
        self.indexer = Indexer(w, layer, args, self.rope) if args.is_csa(layer) else None
        self.H, self.d, self.W, self.eps = args.num_attention_heads, args.head_dim, args.sliding_window, args.rms_norm_eps
        self.G, self.o_rank = args.o_groups, args.o_lora_rank
        self.wo_a_groups = [self.wo_a.row_slice(g * self.o_rank, (g + 1) * self.o_rank) for g in range(self.G)]

    # Three phases for x [T, D] at positions pos [T] (consecutive) → [T, D]: output(attend(x, *project(x, pos), pos,
    # cache), cs). project and output touch no cache (their shapes are fixed for a given T, so the engine may replay
    # them from CUDA graphs); attend reads and grows the cache.

    def project(self, x: torch.Tensor, pos: torch.Tensor):
        """→ (q [T, H, d], kv [T, d], the normed q latent qr [T, q_lora], rope cos/sin) for x [T, D] at pos."""
        T, H, d = x.shape[0], self.H, self.d
        cs = self.rope.cos_sin(pos)
        qa, kv = linear_many([(x, self.wq_a), (x, self.wkv)])
        qr = rms_norm(qa, self.q_norm, self.eps)
        q = rms_norm(linear(qr, self.wq_b).view(T, H, d), None, self.eps)
        q = self.rope.apply(q, cs)  # (T, H, d)
        kv = self.rope.apply(rms_norm(kv, self.kv_norm, self.eps), cs)  # (T, d)
        return q, kv, qr, cs

    def output(self, out: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
        """Attention output [T, H, d] → [T, D]: inverse rope, grouped low-rank output projection."""
        T = out.shape[0]
        out = self.rope.apply(out, cs, inverse=True)
        og = out.reshape(T, self.G, -1)  # (T, G, H/G·d)
        y = torch.cat(linear_many([(og[:, g], self.wo_a_groups[g]) for g in range(self.G)]), dim=-1)
        return linear(y, self.wo_b)

    def attend(self, x, q, kv, qr, cs, pos, lc: LayerCache) -> torch.Tensor:
        """Append this call's kv to the cache, update the compressors, attend → (T, H, d) before `output`."""
        T = x.shape[0]
        # window keys: the stored last W-1 rows, then this call's rows (read back through the storage format)
        prior = lc.window.get()
        kv = lc.window.append(kv)
        keys = torch.cat([prior, kv])  # (K, d)
        lc.window.keep_last(lc.window_len)
        # One query (decode) may see every key it is given: the window holds at most W − 1 earlier rows and every
        # stored entry is complete at its position. Masks are built for chunks only (None: all allowed).
        allowed = None
        if T > 1:
            # key positions relative to the first query (host ints only: no device sync)
            kpos = torch.arange(-prior.shape[0], T, device=x.device)
            qpos = torch.arange(T, device=x.device)
            allowed = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - self.W)  # (T, K)

        if self.compressor is None:
            out = self._attend(q, keys, allowed)
        else:
            self.compressor.update(lc.compressor, x)
            entries = lc.compressor.entries
            N = entries.n
            if self.indexer is not None and allowed is None and N <= self.indexer.topk:
                # One query with at most top-k entries, all complete at its position: the index scores would choose
                # every one, so only the indexer's compressor advances; its two projections and the scoring are
                # skipped (at Flash's top-512, every decode step before 2K tokens of context).
                self.indexer.compressor.update(lc.indexer, x)
                out = self._attend(q, torch.cat([keys, entries.get()]), None)
            elif self.indexer is not None:
                idx, valid = self.indexer.select(lc.indexer, x, qr, cs, pos)
                if allowed is None:  # one query: its chosen entries (all complete) join the window's keys
                    chosen = entries.take(idx[0]) if idx.shape[1] < N else entries.get()
                    out = self._attend(q, torch.cat([keys, chosen]), None)
                elif idx.shape[1] < N:
                    out = self._gathered(q, keys, allowed, entries, idx, valid)
                else:  # every entry is a candidate: dense with a mask is the same sum and cheaper
                    seen = torch.zeros(T, N + 1, dtype=torch.bool, device=x.device)
                    seen.scatter_(1, torch.where(valid, idx, N), True)
                    out = self._attend(q, torch.cat([keys, entries.get()]), torch.cat([allowed, seen[:, :N]], 1))
            else:
                seen = None
                if allowed is not None:
                    done = torch.arange(N, device=x.device)[None, :] < ((pos + 1) // self.ratio)[:, None]
                    seen = torch.cat([allowed, done], 1)
                out = self._attend(q, torch.cat([keys, entries.get()]), seen)
        return out

    # query rows per block when gathering top-k entries: bounds the [rows, k, d] gather to ~64 MB of f32
    GATHER_ELEMS = 1 << 24

    def _softmax_out(self, logits: torch.Tensor, values: torch.Tensor, extra=None) -> torch.Tensor:
        """Softmax over keys with a per-head sink logit in the denominator only → (T, H, d).

        `extra` = (logits [H, T, k], values [T, k, d]): per-query candidates (gathered top-k entries)."""
        H = self.H
        sink = self.sink.view(H, 1, 1)
        mx = torch.maximum(logits.amax(-1, keepdim=True), sink)
        if extra is not None:
            mx = torch.maximum(mx, extra[0].amax(-1, keepdim=True))
        p = torch.exp(logits - mx)
        den = p.sum(-1, keepdim=True) + torch.exp(sink - mx)
        out = torch.einsum("htk,kd->thd", p, values)
        if extra is not None:
            pe = torch.exp(extra[0] - mx)
            den = den + pe.sum(-1, keepdim=True)
            out = out + torch.einsum("htk,tkd->thd", pe, extra[1])
        return out / den.permute(1, 0, 2)

    def _attend(self, q: torch.Tensor, kv: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """q [T, H, d] over the shared key/value rows kv [K, d] where allowed [T, K] (None: all) → (T, H, d), the
        sink in the denominator only: it is one more key of value zero whose logit (the per-head sink) comes in as
        the additive mask, so torch's fused attention does the whole softmax without materializing the
        probabilities."""
        T, H, d = q.shape
        K = kv.shape[0]
        if T == 1:
            # decode: two small matmuls over the shared rows; torch's fused kernel, built for long queries, took
            # 2-3x as long at one query (~0.4 vs ~0.17 ms for 64 heads over 129 rows, 2 threads)
            logits = torch.mm(q[0], kv.t()).mul_(d ** -0.5)  # (H, K)
            if allowed is not None:
                logits.masked_fill_(~allowed, float("-inf"))
            p = torch.softmax(torch.cat([logits, self.sink[:, None]], 1), dim=-1)
            return torch.mm(p[:, :K], kv)[None]
        kv = torch.cat([kv, kv.new_zeros(1, d)])[None, None].expand(1, H, K + 1, d)
        mask = q.new_empty(H, T, K + 1)
        mask[:, :, :K] = torch.where(allowed, 0.0, float("-inf"))
        mask[:, :, K] = self.sink[:, None]
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kv, kv, attn_mask=mask[None], scale=d ** -0.5)
        return out[0].transpose(0, 1)

    def _gathered(self, q, keys, allowed, entries, idx, valid) -> torch.Tensor:
        """Window keys + only each query's top-k entries, decoded from storage by index (CSA at length)."""
        logits = torch.einsum("thd,kd->htk", q, keys) * self.d ** -0.5
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        T, k = idx.shape
        step = max(1, self.GATHER_ELEMS // max(1, k * self.d))
        outs = []
        for a in range(0, T, step):
            b = min(T, a + step)
            sel = entries.take(torch.where(valid[a:b], idx[a:b], 0))  # (rows, k, d)
            c = torch.einsum("thd,tkd->htk", q[a:b], sel) * self.d ** -0.5
            c = c.masked_fill(~valid[a:b][None], float("-inf"))
            outs.append(self._softmax_out(logits[:, a:b], keys, (c, sel)))
        return torch.cat(outs)


class MoE:
    """Routed experts (sqrt-softplus scores, bias or hash selection) + one always-on shared expert: the FFN is
    routed(x, *route(x, ids)) + shared_out(x) (Block.mix / Block.finish)."""

    # at or below this many (token, expert) pairs, gather the experts' weights in one shot (no host sync)
    GATHER_MAX = 16

    def __init__(self, w: Weights, layer: int, args: ModelArgs):
        b = lambda s: names.blk(layer, s)  # noqa: E731
        self.gate = w.f32(b("ffn.gate.weight"))
        self.hash = args.is_hash(layer)
        if self.hash:
            self.tid2eid = w.q(b("ffn.gate.tid2eid")).plain().long()
            # checked once here: the expert kernels index expert bytes by these ids (the GPU's with no host check)
            E, ids = args.n_routed_experts, self.tid2eid
            if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < E):
                raise GGUFError(f"{b('ffn.gate.tid2eid')}: hash routing names experts outside 0..{E - 1}",
                                hint="the file is damaged or was written for another model; convert it again")
        else:
            self.bias = w.f32(b("ffn.gate.bias"))
        self.w1, self.w3, self.w2 = (w.q(names.experts(layer, k)) for k in ("w1", "w3", "w2"))
        # the shared expert as a stack of one expert (the file's bytes, viewed [1, out, in]): at decode it goes
        # through the fused expert kernels, at prefill through `linear` on .expert(0)
        self.shared = tuple(QWeight(t.raw, t.qtype, (1, *t.shape))
                            for t in (w.q(b(f"ffn.shared_experts.{k}.weight")) for k in ("w1", "w3", "w2")))
        self.k, self.E, self.scale, self.limit = (args.num_experts_per_tok, args.n_routed_experts,
                                                  args.routed_scaling_factor, args.swiglu_limit)

    def route(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] → each token's k experts idx [T, k] and their weights wts [T, k]."""
        scores = torch.sqrt(F.softplus(F.linear(x, self.gate)))  # (T, E)
        if self.hash:
            idx = self.tid2eid[ids]
        else:
            idx = torch.topk(scores + self.bias, self.k, dim=-1).indices
        wts = scores.gather(1, idx)
        return idx, wts / (wts.sum(-1, keepdim=True) + 1e-20) * self.scale

    def routed(self, x: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
        """Σ_j wts[t, j] · expert idx[t, j](x_t) → [T, D], the experts on x's device. Few (token, expert) pairs
        (decode): each selected expert's bytes read once, no host sync; many (prefill): one product per active
        expert over the tokens routed to it."""
        ws = (self.w1, self.w3, self.w2)
        if idx.numel() <= self.GATHER_MAX:
            return routed_experts(x, idx, wts, *ws, self.limit)
        return grouped_experts(x, idx, wts, *ws, self.limit)

    def shared_out(self, x: torch.Tensor) -> torch.Tensor:
        """The always-on shared expert."""
        if x.shape[0] * self.k <= self.GATHER_MAX:
            return self._shared_one_call(x)
        s1, s3, s2 = (t.expert(0) for t in self.shared)
        return linear(swiglu(*linear_many([(x, s1), (x, s3)]), self.limit), s2)

    def _shared_one_call(self, x):
        """The shared expert at decode: one more expert of weight 1 through the fused expert kernel (gate, up, SwiGLU
        and down in one call: 1.07 vs 1.31 ms a layer for three products and the torch SwiGLU, Flash shapes, CPU)."""
        T = x.shape[0]
        one = torch.zeros(T, 1, dtype=torch.long, device=x.device)
        return routed_experts(x, one, torch.ones(T, 1, device=x.device), *self.shared, self.limit)


class Block:
    def __init__(self, w: Weights, layer: int, args: ModelArgs, ropes: dict[str, Rope]):
        b = lambda s: names.blk(layer, s)  # noqa: E731
        self.attn_hc = HyperConnection(w.f32(b("hc_attn_fn")), w.f32(b("hc_attn_base")), w.f32(b("hc_attn_scale")), args)
        self.ffn_hc = HyperConnection(w.f32(b("hc_ffn_fn")), w.f32(b("hc_ffn_base")), w.f32(b("hc_ffn_scale")), args)
        self.attn_norm, self.ffn_norm = w.f32(b("attn_norm.weight")), w.f32(b("ffn_norm.weight"))
        self.attn, self.moe, self.eps = Attention(w, layer, args, ropes), MoE(w, layer, args), args.rms_norm_eps
        self.device = self.attn_norm.device

    def __call__(self, X, ids, pos, lc: LayerCache):
        x, q, kv, qr, cs, post_w, comb = self.pre(X, pos)
        out = self.attn.attend(x, q, kv, qr, cs, pos, lc)
        return self.post(out, cs, X, post_w, comb, ids)

    # `pre`, `post`, `mix` and `finish` are pure functions of their tensors (no cache), with shapes fixed for a
    # given T: the engine may swap in fused or CUDA-graphed versions for decode (v4cli/engine/specialize.py,
    # v4cli/engine/cuda_graphs.py). `post` looks `mix`, `moe.routed` and `finish` up at each call, so each of them
    # may be swapped alone.

    def pre(self, X, pos):
        """Streams X [T, S, D] → the attention input x, its projections (q, kv, qr, cs) and the mHC post / comb."""
        a, post_w, comb = self.attn_hc.pre(X)
        x = rms_norm(a, self.attn_norm, self.eps)
        return (x, *self.attn.project(x, pos), post_w, comb)

    def post(self, out, cs, X, post_w, comb, ids):
        """Attention output → the streams after this block: mix (output projection, mHC expand, the FFN's collapse
        and routing) → routed experts → finish (shared expert, mHC expand)."""
        X, a, post_w, comb, idx, wts = self.mix(out, cs, X, post_w, comb, ids)
        return self.finish(self.moe.routed(a, idx, wts), a, X, post_w, comb)

    def mix(self, out, cs, X, post_w, comb, ids):
        """`post` up to the routed experts: output projection, mHC expand, the FFN's mHC collapse and norm (→ a),
        routing (→ idx, wts)."""
        X = HyperConnection.post(self.attn.output(out, cs), X, post_w, comb)
        a, post_w, comb = self.ffn_hc.pre(X)
        a = rms_norm(a, self.ffn_norm, self.eps)
        return (X, a, post_w, comb, *self.moe.route(a, ids))

    def finish(self, routed, a, X, post_w, comb):
        """`post` after the routed experts: add the shared expert's output, mHC expand."""
        return HyperConnection.post(routed + self.moe.shared_out(a), X, post_w, comb)


class DeepseekV4:
    """The whole model over GGUF tensors. `forward(ids, cache)` advances the cache by len(ids) tokens."""

    def __init__(self, args: ModelArgs, tensors: Mapping[str, QWeight]):
        w = Weights(tensors)
        self.args = args
        self.tensors = tensors  # by GGUF name; `v4 imatrix` finds a product's tensor among them
        self.ropes = ropes = {"main": Rope(args.qk_rope_head_dim, args.rope_theta),
                              "compress": Rope(args.qk_rope_head_dim, args.compress_rope_theta, yarn=args)}
        self.embed = w.q(names.root("embed.weight"))
        self.head = w.q(names.root("head.weight"))
        self.norm = w.f32(names.root("norm.weight"))
        self.head_mix = head_mixer(w, args)
        self.blocks = [Block(w, i, args, ropes) for i in range(args.num_hidden_layers)]

    def make_cache(self, kv_format: str = DEFAULT_KV_FORMAT, ctx: int | None = None) -> ModelCache:
        """Empty state for one sequence, storing kv in `kv_format` ("f32", "bf16" or "fp8"); `ctx`: the context it
        is planned for, whose compressed entries are reserved up front (unwritten pages cost no memory)."""
        a = self.args
        kv_c, idx_c = codecs(kv_format, a.qk_rope_head_dim)
        layers = []
        for i, blk in enumerate(self.blocks):  # each layer's state lives with the layer
            dev = blk.device
            lc = LayerCache(Rows(kv_c, a.head_dim, dev), a.sliding_window - 1)
            if a.compress_ratios[i]:
                entries = (ctx or 0) // a.compress_ratios[i]
                lc.compressor = CompressorState(Rows(kv_c, a.head_dim, dev, entries), a.compress_ratios[i])
            if a.is_csa(i):
                # ratio 4, as the Indexer's compressor
                lc.indexer = CompressorState(Rows(idx_c, a.index_head_dim, dev, (ctx or 0) // 4), 4)
            layers.append(lc)
        return ModelCache(layers, kv_format)

    def streams(self, ids: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        """ids [T] → the final mHC streams [T, S, D] (before the head's collapse); advances the cache."""
        T = ids.shape[0]
        pos = torch.arange(cache.pos, cache.pos + T, device=ids.device)
        x = self.embed_ids(ids, self.blocks[0].device)  # (T, D)
        X = x[:, None, :].expand(-1, self.args.hc_mult, -1).contiguous()  # (T, S, D)
        for blk, lc in zip(self.blocks, cache.layers):
            if X.device != blk.device:  # a layer placed elsewhere (hybrid placement): the streams follow it
                X, ids, pos = X.to(blk.device), ids.to(blk.device), pos.to(blk.device)
            X = blk(X, ids, pos, lc)
        cache.pos += T
        return X.to(self.head.device)

    def embed_ids(self, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Token embeddings [T, D] on `device`: the rows are gathered where the table lives (host memory under a
        GPU, where the placement plan keeps it)."""
        return embedding(ids.to(self.embed.device), self.embed).to(device)

    def head_logits(self, X: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Final streams [T, S, D] → logits [T, vocab] (or [1, vocab]) in f32."""
        if last_only:
            X = X[-1:]
        return linear(collapse(X, self.head_mix, self.norm), self.head)

    def forward(self, ids: torch.Tensor, cache: ModelCache, last_only: bool = False) -> torch.Tensor:
        """ids [T] → logits [T, vocab] (or [1, vocab] with last_only) in f32."""
        return self.head_logits(self.streams(ids, cache), last_only)


def head_mixer(w: Weights, args: ModelArgs) -> MixerParams:
    """The output head's mHC collapse weights (the trunk's, or the MTP draft file's own)."""
    fn, base, scale = (w.f32(names.root(f"hc_head_{k}")) for k in ("fn", "base", "scale"))
    return MixerParams(fn, scale, base, args.hc_mult, 0, args.hc_eps, args.rms_norm_eps)


def collapse(X: torch.Tensor, p: MixerParams, norm: torch.Tensor) -> torch.Tensor:
    """The head's mHC collapse of the streams X [T, S, D] (sigmoid-weighted sum), then its RMSNorm → [T, D]."""
    return rms_norm(hc_collapse(X, p), norm, p.norm_eps)


class MTP:
    """The draft block (facts §4, llama.cpp's separate MTP file): predicts the token after next.

    Convention (llama.cpp's): the draft at position p reads token x_p and the trunk's final streams from p − 1
    (zeros at p = 0) and predicts x_{p+1}. It has its own one-layer cache (a sliding window), its own hc_head and
    head norm, and shares the trunk's embedding and output head.
    """

    def __init__(self, trunk: DeepseekV4, tensors: Mapping[str, QWeight]):
        w, args = Weights(tensors), trunk.args
        self.args, self.trunk = args, trunk
        self.layer = L = args.num_hidden_layers
        self.eh_proj = w.q(names.mtp_eh_proj(L))
        self.enorm, self.hnorm = w.f32(names.mtp_blk(L, "enorm.weight")), w.f32(names.mtp_blk(L, "hnorm.weight"))
        head_norm = names.mtp_blk(L, "norm.weight")
        self.norm = w.f32(head_norm) if w.has(head_norm) else trunk.norm  # llama.cpp treats it as optional
        self.head_mix = head_mixer(w, args)
        self.block = Block(w, L, args, trunk.ropes)

    def make_cache(self, kv_format: str = DEFAULT_KV_FORMAT) -> ModelCache:
        """Empty draft state: one sliding-window layer (the draft block attends over its own past inputs)."""
        kv_c, _ = codecs(kv_format, self.args.qk_rope_head_dim)
        rows = Rows(kv_c, self.args.head_dim, self.block.device)
        return ModelCache([LayerCache(rows, self.args.sliding_window - 1)], kv_format)

    def forward(self, prev: torch.Tensor, ids: torch.Tensor, cache: ModelCache) -> torch.Tensor:
        """prev [T, S, D] = trunk streams of the positions before ids [T] → draft logits [T, vocab]."""
        a, eps = self.args, self.args.rms_norm_eps
        T, S = prev.shape[0], a.hc_mult
        pos = torch.arange(cache.pos, cache.pos + T, device=ids.device)
        e = rms_norm(self.trunk.embed_ids(ids, self.enorm.device), self.enorm, eps)  # (T, D)
        h = rms_norm(prev, self.hnorm, eps)  # per stream: (T, S, D)
        x = linear(torch.cat([e[:, None, :].expand(-1, S, -1), h], dim=-1).reshape(T * S, -1), self.eh_proj)
        X = self.block(x.view(T, S, -1), ids, pos, cache.layers[0])
        cache.pos += T
        return linear(collapse(X, self.head_mix, self.norm), self.trunk.head)
