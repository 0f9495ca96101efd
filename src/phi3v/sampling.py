"""Choosing the next token: greedy, or temperature / top-k / top-p sampling with a per-request seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from phi3v.errors import Phi3VError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy (exact argmax); top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise Phi3VError(f"temperature must be between 0 and 100, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise Phi3VError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise Phi3VError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator()
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


def filter_logits(logits: Tensor, p: SamplingParams) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus) on a 1-D float32 row; removed entries become -inf."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p; the top token always stays
        drop = probs.cumsum(-1) - probs >= p.top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample_rows(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """Next token id for each row of (B, vocab) float32 logits. Sampling runs on the CPU, so a seed gives
    the same tokens on every device."""
    out = logits.argmax(-1).tolist()
    for i, (p, g) in enumerate(zip(params, generators)):
        if not p.greedy:
            probs = filter_logits(logits[i].float().cpu(), p).softmax(-1)
            out[i] = int(torch.multinomial(probs, 1, generator=g))
    return out
