"""End-to-end generation on a tiny checkpoint: batching, streaming, stopping, LongRoPE re-prefill (spec §3.5, §6.5)."""

import pytest
import torch
from PIL import Image

import phi3v
import phi3v.generate as gen
from phi3v.checkpoint import random_model
from phi3v.generate import Batch, GenerationOptions, Request
from phi3v.prompt import Tokenizer

from .conftest import crossing_config

CONVERSATIONS = [
    "Describe the weather.",
    [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (640, 480), "red")},
                                  {"type": "text", "text": "What colour is this?"}]}],  # fmt: skip
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, how are you today?"}],
]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return phi3v.load(tiny_checkpoint, device="cpu", dtype="float32")


def record_logits(monkeypatch):
    seen = []
    original = gen.sample_rows

    def spy(logits, params, generators):
        seen.append(logits.clone())
        return original(logits, params, generators)

    monkeypatch.setattr(gen, "sample_rows", spy)
    return seen


def test_chat_returns_text_and_is_deterministic(tiny):
    a = tiny.chat(CONVERSATIONS[1], max_new_tokens=12)
    assert isinstance(a, str) and a == tiny.chat(CONVERSATIONS[1], max_new_tokens=12)


def test_batch_equals_single(tiny):
    """Each row of a batch gives the same tokens as running it alone (left-padding-free row cache)."""
    alone = []
    for c in CONVERSATIONS:
        r = tiny.request(c, max_new_tokens=10)
        list(gen.generate(tiny.model, tiny.tokenizer, [r]))
        alone.append(r.tokens)
    reqs = [tiny.request(c, max_new_tokens=10) for c in CONVERSATIONS]
    list(gen.generate(tiny.model, tiny.tokenizer, reqs))
    assert [r.tokens for r in reqs] == alone
    assert tiny.chat_batch(CONVERSATIONS, max_new_tokens=10) == [tiny.chat(c, max_new_tokens=10) for c in CONVERSATIONS]


def test_stream_equals_chat(tiny):
    deltas = list(tiny.stream(CONVERSATIONS[0], max_new_tokens=16))
    assert "".join(deltas) == tiny.chat(CONVERSATIONS[0], max_new_tokens=16)
    assert all("\ufffd" not in d for d in deltas)


def test_cached_steps_equal_full_recompute(tiny, monkeypatch):
    """Every decode step's logits equal a full pass over prompt + generated tokens."""
    seen = record_logits(monkeypatch)
    r = tiny.request(CONVERSATIONS[1], max_new_tokens=6)
    list(gen.generate(tiny.model, tiny.tokenizer, [r]))
    for step, logits in enumerate(seen):
        ids = torch.cat([r.input_ids, torch.tensor(r.tokens[:step], dtype=torch.long)])[None]
        full = tiny.model.embed(ids, r.image_features)
        n = ids.shape[1]
        ref = tiny.model.forward_cached(full, torch.arange(n)[None], _fresh_cache(tiny.model, n), slice(0, 1), n)
        v = tiny.tokenizer.vocab_size
        assert (logits[:, :v] - ref[:, :v]).abs().max() <= 1e-4
        assert torch.isneginf(logits[:, v:]).all()


@pytest.mark.skipif(phi3v.cpu_kernels.get() is None, reason="phi3v's CPU kernels are not built here")
def test_decode_attention_kernel_equals_sdpa(tiny, monkeypatch):
    """Decoding steps read the cache with cpu_kernels.decode_attention; with SDPA instead, the same logits."""
    import phi3v.language as language

    calls = []
    kernel = language._decode_kernels
    monkeypatch.setattr(language, "_decode_kernels", lambda q, k: calls.append(q.shape) or kernel(q, k))
    seen = record_logits(monkeypatch)
    reqs = [tiny.request(c, max_new_tokens=6, ignore_eos=True) for c in CONVERSATIONS]
    list(gen.generate(tiny.model, tiny.tokenizer, reqs))
    assert calls  # the decoding steps went through the kernel
    seen = list(seen)  # the spy below wraps this one, which goes on recording
    monkeypatch.setattr(language, "_decode_kernels", lambda q, k: None)
    plain = record_logits(monkeypatch)
    again = [tiny.request(c, max_new_tokens=6, ignore_eos=True) for c in CONVERSATIONS]
    list(gen.generate(tiny.model, tiny.tokenizer, again))
    assert [r.tokens for r in again] == [r.tokens for r in reqs]
    assert len(seen) == len(plain)
    for a, b in zip(seen, plain):
        v = tiny.tokenizer.vocab_size
        assert (a[:, :v] - b[:, :v]).abs().max() <= 1e-5


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_kv_cache_stays_close_to_float32(tiny_checkpoint, monkeypatch, native):
    """kv_dtype="bfloat16" keeps a bf16 cache under float32 compute (what quantized models get on the CPU by
    default); decoding reads it through the kernel or, without it, widened for SDPA. The logits stay
    within bf16 rounding of a float32 cache's, for the same tokens."""
    import phi3v.language as language

    if native and phi3v.cpu_kernels.get() is None:
        pytest.skip("phi3v's CPU kernels are not built here")
    if not native:
        monkeypatch.setattr(language, "_decode_kernels", lambda q, k: None)
    runs = []
    for kv in ("float32", "bfloat16"):
        m = phi3v.load(tiny_checkpoint, device="cpu", dtype="float32", kv_dtype=kv)
        assert m.model.cache_dtype == getattr(torch, kv)
        seen = record_logits(monkeypatch)
        r = m.request(CONVERSATIONS[1], max_new_tokens=5, ignore_eos=True)
        batch = gen.Batch(m.model, m.tokenizer)
        batch.add(r)
        while r.finish_reason is None:
            batch.step()
        assert batch.cache.k.dtype == getattr(torch, kv)
        runs.append((r.tokens, torch.cat(seen)))
    (tokens32, logits32), (tokens16, logits16) = runs
    assert tokens16 == tokens32
    v = m.tokenizer.vocab_size  # the padding rows past it are -inf in both
    err = (logits16[:, :v] - logits32[:, :v]).abs().max() / logits32[:, :v].abs().max()
    assert 0 < err < 2e-2


def _fresh_cache(model, n):
    t = model.config.text
    c = gen.KVCache(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, model.dtype, model.device)
    c.reserve(1, n)
    return c


def test_generation_crossing_original_max_position_reprefills(tokenizer_dir, monkeypatch):
    """Crossing orig=32 mid-generation: logits equal HF Phi3ForCausalLM full passes (long factors),
    which needs the cache recomputed at the switch (spec §3.5, pitfall 7)."""
    transformers = pytest.importorskip("transformers")
    from .test_language import hf_twin

    model = random_model(crossing_config(32), seed=5)
    hf = hf_twin(model)
    tok = Tokenizer.from_dir(tokenizer_dir)
    seen = record_logits(monkeypatch)
    prompt = torch.tensor(tok.encode("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"))
    assert 20 < prompt.numel() < 32
    r = Request(prompt, None, GenerationOptions(max_new_tokens=40 - prompt.numel(), ignore_eos=True))
    list(gen.generate(model, tok, [r]))
    assert len(r.tokens) == 40 - prompt.numel() and r.long_rope
    for step, logits in enumerate(seen):
        ids = torch.cat([prompt, torch.tensor(r.tokens[:step], dtype=torch.long)])[None]
        with torch.no_grad():
            ref = hf(input_ids=ids).logits[0, -1].float()
        v = tok.vocab_size
        assert (logits[0, :v] - ref[:v]).abs().max() <= 1e-4, f"step {step}, length {ids.shape[1]}"
    del transformers


def biased(tiny_checkpoint, token_id, bias=1e4):
    """The tiny model with its logits pushed towards one token id."""
    m = phi3v.load(tiny_checkpoint, device="cpu", dtype="float32")
    plain = m.model.logits

    def logits(h):
        out = plain(h)
        out[..., token_id] += bias
        return out

    m.model.logits = logits
    return m


def test_stops_on_end_token_whatever_generation_config_says(tiny_checkpoint):
    """generation_config.json says eos 2; <|end|> (and <|endoftext|>) still stop (spec §6.5)."""
    for stop in ("<|end|>", "<|endoftext|>"):
        m = biased(tiny_checkpoint, Tokenizer.from_dir(tiny_checkpoint).token_to_id(stop))
        r = m.request("hi", max_new_tokens=20)
        events = list(gen.generate(m.model, m.tokenizer, [r]))
        assert r.tokens == [] and r.text == "" and events[-1].finish_reason == "stop"


def test_never_emits_padding_vocab(tiny_checkpoint):
    """Ids >= the tokenizer's 32045 are masked even when the model prefers them (spec §6.5)."""
    m = biased(tiny_checkpoint, 32050)
    r = m.request("hi", max_new_tokens=5)
    list(gen.generate(m.model, m.tokenizer, [r]))
    assert len(r.tokens) == 5 and max(r.tokens) < 32045


def test_length_stop_ids_and_stop_strings(tiny):
    r = tiny.request(CONVERSATIONS[0], max_new_tokens=12, ignore_eos=True)
    events = list(gen.generate(tiny.model, tiny.tokenizer, [r]))
    assert len(r.tokens) == 12 and events[-1].finish_reason == "length"
    full_tokens, full_text = r.tokens, r.text

    r2 = tiny.request(CONVERSATIONS[0], max_new_tokens=12, ignore_eos=True, stop_token_ids=[full_tokens[4]])
    list(gen.generate(tiny.model, tiny.tokenizer, [r2]))
    assert r2.tokens == full_tokens[: full_tokens.index(full_tokens[4])] and r2.finish_reason == "stop"

    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 3]
    assert len(stop) == 3
    deltas = list(tiny.stream(CONVERSATIONS[0], max_new_tokens=12, ignore_eos=True, stop=[stop]))
    assert "".join(deltas) == full_text[: full_text.index(stop)]


def test_sampling_is_seeded(tiny):
    a = tiny.chat("Tell a story.", max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1)
    assert a == tiny.chat("Tell a story.", max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1)
    outs = {tiny.chat("Tell a story.", max_new_tokens=10, temperature=1.5, seed=s) for s in range(4)}
    assert len(outs) > 1


def test_continuous_batch_join_and_leave(tiny):
    """A request added between steps joins the running batch; results equal running alone."""
    solo = []
    for c in CONVERSATIONS[:2]:
        r = tiny.request(c, max_new_tokens=8, ignore_eos=True)
        list(gen.generate(tiny.model, tiny.tokenizer, [r]))
        solo.append(r.tokens)
    b = Batch(tiny.model, tiny.tokenizer)
    r1 = tiny.request(CONVERSATIONS[0], max_new_tokens=8, ignore_eos=True)
    r2 = tiny.request(CONVERSATIONS[1], max_new_tokens=8, ignore_eos=True)
    b.add(r1)
    for _ in range(3):
        b.step()
    b.add(r2)
    while len(b):
        b.step()
    assert [r1.tokens, r2.tokens] == solo


def test_padded_group_prefill_equals_alone(tiny, monkeypatch):
    """Prompts of similar length are prefilled together, right-padded; each row equals running alone."""
    prompts = ["Tell me a short story about a cat.", "Tell me a story about a very small brown dog.",
               "What is the capital city of France, and why?"]  # fmt: skip
    alone = []
    for p in prompts:
        r = tiny.request(p, max_new_tokens=8, ignore_eos=True)
        list(gen.generate(tiny.model, tiny.tokenizer, [r]))
        alone.append(r.tokens)
    reqs = [tiny.request(p, max_new_tokens=8, ignore_eos=True) for p in prompts]
    lengths = {r.prompt_tokens for r in reqs}
    assert len(lengths) == 3 and len(gen._similar_lengths(reqs)) == 1  # one padded forward
    list(gen.generate(tiny.model, tiny.tokenizer, reqs))
    assert [r.tokens for r in reqs] == alone
