"""Token sampling: temperature, top-k, top-p, min-p, reproducible through a seeded torch.Generator; an optional
allowed-token mask (constrained decoding) and the sampled token's log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.errors import BadInput
from v4cli.engine.options import RUN


@dataclass(frozen=True)
class SamplingParams:
    """Defaults follow the model card (temperature 1.0, top_p 1.0). temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    stop_on_eos: bool = True

    def __post_init__(self):
        if self.temperature < 0:
            raise BadInput(f"temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise BadInput(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or not 0 <= self.min_p < 1 or self.max_tokens < 0:
            raise BadInput("--top-k and --max-tokens must be ≥ 0 and --min-p in [0, 1)")


class Sampler:
    """Draws one token id per call from logits [V]; returns a device tensor (the caller decides when to sync)."""

    def __init__(self, params: SamplingParams, device: torch.device | str = RUN.device):
        self.p = params
        self.gen = torch.Generator(device=device)
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()

    def filtered_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution actually sampled from, after temperature and the top-k/top-p/min-p filters."""
        p = self.p
        x = logits.float() / p.temperature
        if p.top_k > 0 and p.top_k < x.shape[-1]:
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1:
            sp, si = torch.sort(probs, descending=True)
            # drop a token once the mass before it already reaches top_p (the first token always stays)
            drop = (sp.cumsum(-1) - sp) >= p.top_p * sp.sum()
            probs = probs.scatter(0, si, sp.masked_fill(drop, 0.0))
        return probs / probs.sum()

    def __call__(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """`allowed`: a bool mask over the vocabulary (a grammar's next-token set). Disallowed logits become -inf
        before temperature and the filters, so top-p/min-p renormalize over allowed tokens only. A mask shorter
        than the logits (the tokenizer knows fewer ids than the model's padded vocabulary) disallows the rest."""
        if allowed is not None:
            logits = _masked(logits, allowed)
        if self.p.temperature == 0:
            return torch.argmax(logits)
        return torch.multinomial(self.filtered_probs(logits), 1, generator=self.gen)[0]


def _masked(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    V = logits.shape[-1]
    keep = allowed[:V]
    if keep.shape[-1] < V:
        keep = torch.cat([keep, keep.new_zeros(V - keep.shape[-1])])
    return logits.masked_fill(~keep, float("-inf"))


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The sampled token's log-probability and the `top` most likely (id, logprob), under the raw model
    distribution (log-softmax of the unmasked logits: what OpenAI's `logprobs` report). Costs one host sync."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    if top > 0:
        vals, ids = torch.topk(lp, min(top, lp.shape[-1]))
        pairs = tuple(zip(ids.tolist(), vals.tolist()))
    else:
        pairs = ()
    return float(lp[token]), pairs
