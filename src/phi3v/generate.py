"""Autoregressive generation over a shared KV cache: prefill, batched decode steps, stopping, streaming.

`Batch` is the one scheduler: a request is prefilled into a free cache row whenever it is added, and every
`step()` decodes all active rows together, so requests can join and leave between steps. `generate()`
runs a fixed set of requests to completion; the engine and the server drive the same `Batch`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from phi3v.errors import Phi3VError
from phi3v.kv_cache import KVCache
from phi3v.model import Phi3VForCausalLM
from phi3v.prompt import StreamDecoder, Tokenizer
from phi3v.rope import uses_long_factors
from phi3v.sampling import SamplingParams, sample_rows


@dataclass(frozen=True)
class GenerationOptions:
    """What to generate: length, sampling and extra stop conditions.

    Generation always stops on the tokenizer's `<|end|>` and `<|endoftext|>` (spec §6.5), whatever a
    checkpoint's generation_config.json says; `stop_token_ids` and `stop` (strings) add to that set.
    `ignore_eos` (benchmarks) disables stopping on tokens.
    """

    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise Phi3VError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")


@dataclass(eq=False)  # identity, not field equality: requests hold tensors
class Request:
    """One sequence: its prompt (ids with negative image placeholders and the projected image rows) and
    what has been generated so far."""

    input_ids: Tensor  # (L,) int64
    image_features: Tensor | None
    options: GenerationOptions = field(default_factory=GenerationOptions)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length"
    cached: int = 0  # tokens whose keys/values are in the cache row
    long_rope: bool = False  # whether the cached keys were rotated with the long factor list
    decoder: StreamDecoder | None = None
    generator: torch.Generator | None = None
    held: str = ""  # text withheld from streaming because it may be the start of a stop string
    limit: int = 0  # the most new tokens this request may produce (max_new_tokens within the context)
    stop_ids: frozenset[int] = frozenset()  # token ids that end it: the tokenizer's plus the caller's

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class Event:
    """What one step produced for one request: a text delta (possibly empty) and, at the end, the reason."""

    request: Request
    token: int | None
    text: str
    finish_reason: str | None


class Batch:
    """Active requests, one per KV-cache row, kept dense in rows 0..n-1."""

    def __init__(self, model: Phi3VForCausalLM, tokenizer: Tokenizer):
        t = model.config.text
        self.model, self.tokenizer = model, tokenizer
        self.cache = KVCache(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, model.cache_dtype, model.device)
        self.active: list[Request] = []

    def __len__(self) -> int:
        return len(self.active)

    def check(self, req: Request) -> None:
        """Raise a user error if `req` cannot run here (a prompt that fills the context)."""
        max_pos = self.model.config.text.max_position_embeddings
        if req.prompt_tokens >= max_pos:
            raise Phi3VError(
                f"the prompt is {req.prompt_tokens} tokens but the context holds {max_pos}; "
                "use fewer or smaller images (lower num_crops) or a shorter prompt"
            )

    def add(self, req: Request) -> Event:
        """Prefill `req` into a free row and sample its first token."""
        return self.add_many([req])[0]

    @torch.inference_mode()
    def add_many(self, reqs: Sequence[Request]) -> list[Event]:
        """Prefill several requests in one forward pass (right-padded to the longest) into new rows.

        Padding tokens write keys past each row's end, where attention never looks and decoding
        overwrites them.
        """
        for req in reqs:
            self.check(req)
        max_pos = self.model.config.text.max_position_embeddings
        for req in reqs:
            req.limit = min(req.options.max_new_tokens, max_pos - req.prompt_tokens)
            req.decoder = StreamDecoder(self.tokenizer)
            req.generator = req.options.sampling.make_generator()
            eos = () if req.options.ignore_eos else self.tokenizer.stop_token_ids
            req.stop_ids = frozenset(req.options.stop_token_ids) | frozenset(eos)
        self.cache.reserve(len(self.active) + len(reqs), max(r.prompt_tokens + r.limit for r in reqs))
        events: dict[int, Event] = {}
        for group in _similar_lengths(reqs):
            start = len(self.active)
            embeds = [self.model.embed(r.input_ids[None].to(self.model.device), r.image_features)[0] for r in group]
            x = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)  # (B, L_max, C)
            self.active.extend(group)
            logits = self._prefill(start, x, [e.shape[0] for e in embeds])
            events.update((id(e.request), e) for e in self._accept(group, logits))
        return [events[id(r)] for r in reqs]

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One decode step for every active request; finished requests leave the batch."""
        if not self.active:
            return []
        reqs = list(self.active)
        dev = self.model.device
        last = torch.tensor([[r.tokens[-1]] for r in reqs], device=dev)  # (B, 1)
        pos = torch.tensor([[r.cached] for r in reqs], device=dev)
        kv_len = max(r.cached for r in reqs) + 1
        logits = self.model.forward_cached(self.model.embed(last), pos, self.cache, slice(0, len(reqs)), kv_len)
        for r in reqs:
            r.cached += 1
        for i, r in enumerate(reqs):
            # LongRoPE switches to the long factors once a sequence passes original_max_position_embeddings:
            # keys cached with the short factors are stale, so the row is recomputed (spec §3.5, pitfall 7).
            if not r.long_rope and uses_long_factors(self.model.config.text, r.cached):
                ids = torch.cat([r.input_ids, torch.tensor(r.tokens, dtype=r.input_ids.dtype)])[None].to(dev)
                logits[i] = self._prefill(i, self.model.embed(ids, r.image_features))[0]
        return self._accept(reqs, logits)

    def drop(self, req: Request) -> None:
        """Remove an unfinished request (its client went away); its row is free for the next one."""
        for i, r in enumerate(self.active):
            if r is req:
                self._remove(i)
                return

    def _prefill(self, row: int, x: Tensor, lengths: Sequence[int] | None = None) -> Tensor:
        """Rows row.. row+B-1 from position 0: x (B, L, C), each row's real length in `lengths`."""
        B, n, _ = x.shape
        lengths = list(lengths or [n] * B)
        for req, length in zip(self.active[row : row + B], lengths):
            req.cached, req.long_rope = length, uses_long_factors(self.model.config.text, length)
        positions = torch.arange(n, device=x.device)[None].expand(B, n)
        lens = torch.tensor(lengths, device=x.device)
        return self.model.forward_cached(x, positions, self.cache, slice(row, row + B), n, lengths=lens)

    def _accept(self, reqs: Sequence[Request], logits: Tensor) -> list[Event]:
        logits[:, self.tokenizer.vocab_size :] = float("-inf")  # padding rows of the vocab (spec §6.5)
        params = [r.options.sampling for r in reqs]
        tokens = sample_rows(logits, params, [r.generator for r in reqs])
        events = [self._advance(r, tok) for r, tok in zip(reqs, tokens)]
        for e in events:
            if e.finish_reason is not None:
                self._remove(next(i for i, r in enumerate(self.active) if r is e.request))
        return events

    def _advance(self, r: Request, tok: int) -> Event:
        reason = None
        if tok in r.stop_ids:
            reason = "stop"
        else:
            r.tokens.append(tok)
            r.held += r.decoder.push(tok)
            if len(r.tokens) >= r.limit:
                reason = "length"
        if reason is not None:
            r.held += r.decoder.flush()
        cut = min((i for s in r.options.stop if (i := r.held.find(s)) >= 0), default=-1)
        if cut >= 0:
            r.held, reason = r.held[:cut], "stop"
        r.finish_reason = reason
        return Event(r, tok, self._release(r), reason)

    def _release(self, r: Request) -> str:
        """Move text out of `held`, keeping back a tail that could still become a stop string."""
        keep = 0 if r.finish_reason or not r.options.stop else max(len(s) for s in r.options.stop) - 1
        out, r.held = r.held[: len(r.held) - keep], r.held[len(r.held) - keep :]
        r.text += out
        return out

    def _remove(self, row: int) -> None:
        """Free a row; the last active row moves into it so that rows 0..n-1 stay dense."""
        last = len(self.active) - 1
        if row != last:
            self.cache.move(last, row, self.active[last].cached)
            self.active[row] = self.active[last]
        self.active.pop()


def _similar_lengths(reqs: Sequence[Request], slack: float = 1.5) -> list[list[Request]]:
    """Group requests for padded prefills so that no prompt is padded past `slack` times its length."""
    groups: list[list[Request]] = []
    for r in sorted(reqs, key=lambda r: r.prompt_tokens):
        if groups and r.prompt_tokens <= slack * groups[-1][0].prompt_tokens:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def generate(model: Phi3VForCausalLM, tokenizer: Tokenizer, requests: Sequence[Request]) -> Iterator[Event]:
    """Run `requests` together to completion, yielding each step's events as they happen."""
    batch = Batch(model, tokenizer)
    yield from batch.add_many(requests)
    while len(batch):
        yield from batch.step()
