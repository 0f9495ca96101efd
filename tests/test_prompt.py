"""Tokenizer, chat template, image-tag expansion and streaming decode (spec §6, §8.4-5, §9)."""

import json
import random

import pytest

from phi3v.errors import Phi3VError
from phi3v.prompt import IMAGE_TAG, StreamDecoder, Tokenizer, build_input_ids, chat_prompt

SINGLE = "<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n"
TWO = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare the two images.<|end|>\n<|assistant|>\n"
TEXT_ONLY = ("<|system|>\nSystem message<|end|>\n<|user|>\nHello, can you call some tools for me?<|end|>\n"
             "<|assistant|>\nSure, I can calculate the sum for you!<|end|>\n")  # fmt: skip
TEXT_ONLY_IDS = [1, 32006, 29871, 13, 3924, 2643, 32007, 29871, 13, 32010, 29871, 13, 10994, 29892, 508, 366, 1246,
                 777, 8492, 363, 592, 29973, 32007, 29871, 13, 32001, 18585, 29892, 306, 508, 8147, 278, 2533, 363,
                 366, 29991, 32007, 29871, 13]  # fmt: skip


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.from_dir(tokenizer_dir)


# --- Tokenizer (§6.1) -------------------------------------------------------------------------------------


def test_special_ids_looked_up(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.end_token_id) == (1, 32000, 32000, 32007)
    assert tok.stop_token_ids == frozenset({32007, 32000}) and 2 not in tok.stop_token_ids
    assert tok.vocab_size == 32045
    assert tok.token_to_id("<|assistant|>") == 32001 and tok.id_to_token(32010) == "<|user|>"


def test_rstrip_and_leading_space(tok):
    assert tok.encode("<|assistant|>\n", add_bos=False) == [32001]
    assert tok.encode("<|user|>\n", add_bos=False) == [32010, 29871, 13]
    assert tok.encode("<|user|>\n") == [1, 32010, 29871, 13]
    assert tok.encode("") == [1] and tok.encode("", add_bos=False) == []


def test_text_only_worked_ids(tok):
    assert tok.encode(TEXT_ONLY) == TEXT_ONLY_IDS
    assert build_input_ids(tok, TEXT_ONLY, []) == TEXT_ONLY_IDS
    assert tok.apply_chat_template(
        [{"role": "system", "content": "System message"},
         {"role": "user", "content": "Hello, can you call some tools for me?"},
         {"role": "assistant", "content": "Sure, I can calculate the sum for you!"}], tokenize=True,
    ) == TEXT_ONLY_IDS  # fmt: skip


def test_decode_skips_specials_and_invalid_ids(tok):
    ids = tok.encode("<|user|>\nhello world<|end|>\n")
    assert tok.decode(ids) == "\nhello world \n"  # what tokenizers (and HF fast) give for these ids
    assert tok.decode(ids, skip_special_tokens=False).startswith("<s><|user|>")
    assert tok.decode([-1, -1, *tok.encode("hi", add_bos=False), 32045, 32063, -2]) == "hi"
    assert tok.batch_decode([tok.encode("a b"), [-1, 32050]]) == ["a b", ""]
    assert tok.decode(tok.encode("Hi , you ."), clean_up_tokenization_spaces=True) == "Hi, you."


def _byte_tokenizer(folder, with_config: bool = True):
    """A byte-level tokenizer whose special ids are NOT Phi-3's (<s> is last, <|end|> is 0)."""
    from tokenizers import AddedToken, decoders, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    specials = ["<|end|>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<unk>"]
    vocab = {s: i for i, s in enumerate(specials)}
    for piece in [f"<0x{b:02X}>" for b in range(256)] + ["▁", "<s>"]:
        vocab[piece] = len(vocab)
    t = HFTokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])  # fmt: skip
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    t.add_special_tokens([AddedToken(s, normalized=False, rstrip=s == "<|assistant|>") for s in specials + ["<s>"]])
    folder.mkdir(exist_ok=True)
    t.save(str(folder / "tokenizer.json"))
    if with_config:  # AddedToken-dict form, as some tokenizer_config.json files store it
        cfg = {"bos_token": {"content": "<s>"}, "eos_token": "<|endoftext|>", "pad_token": "<|end|>"}
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return Tokenizer.from_dir(folder)


def test_other_tokenizer_ids_not_hard_coded(tmp_path):
    t = _byte_tokenizer(tmp_path / "a")
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id, t.end_token_id) == (262, 1, 0, 0)
    assert t.stop_token_ids == frozenset({0, 1}) and t.vocab_size == 263
    ids = build_input_ids(t, "<|image_1|>x", [3])
    assert ids[:4] == [262, -1, -1, -1] and ids[4] == 262 and t.decode(ids) == "x"
    t2 = _byte_tokenizer(tmp_path / "b", with_config=False)  # defaults: <s>, <|endoftext|>, <|endoftext|>
    assert (t2.bos_token_id, t2.eos_token_id, t2.pad_token_id) == (262, 1, 1)


def test_from_dir_errors(tmp_path):
    with pytest.raises(Phi3VError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


# --- Chat template (§6.2) ---------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "<|image_1|>\nWhat is shown in this image?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": " two\n\nlines "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    [{"role": "user", "content": ""}],
]  # fmt: skip


def test_chat_template_hand_written(tok):
    msgs = CONVERSATIONS[0]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == SINGLE
    assert tok.apply_chat_template(msgs) == SINGLE[: -len("<|assistant|>\n")]
    assert tok.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True) == (
        "<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n")  # last role assistant: no generation prompt
    assert tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True) == tok.encode(SINGLE)


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("msgs", CONVERSATIONS)
def test_chat_template_matches_jinja(tokenizer_dir, tok, msgs, gen):
    jinja2 = pytest.importorskip("jinja2.sandbox")
    template = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"]
    env = jinja2.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as HF renders it
    expected = env.from_string(template).render(messages=msgs, add_generation_prompt=gen)
    assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == expected


# --- Image-tag expansion (§6.3, §6.4, §9) -----------------------------------------------------------------


def test_single_image_worked_example(tok):
    ids = build_input_ids(tok, SINGLE, [1921])
    tail = [1, 29871, 13, 5618, 338, 4318, 297, 445, 1967, 29973, 32007, 29871, 13, 32001]
    assert ids == [1, 32010, 29871, 13] + [-1] * 1921 + tail
    assert len(ids) == 18 + 1921


def test_two_image_worked_example(tok):
    ids = build_input_ids(tok, TWO, [757, 757])
    nl = [1, 29871, 13]
    assert ids == ([1, 32010, 29871, 13] + [-1] * 757 + nl + [-2] * 757 + nl
                   + [6843, 598, 278, 1023, 4558, 29889, 32007, 29871, 13, 32001])  # fmt: skip
    assert len(ids) == 1534


def test_bos_after_each_image_and_empty_first_chunk(tok):
    assert build_input_ids(tok, "<|image_1|><|image_2|>", [2, 3]) == [1, -1, -1, 1, -2, -2, -2, 1]
    assert build_input_ids(tok, "<|image_1|>", [4]) == [1, -1, -1, -1, -1, 1]


def test_no_images_keeps_tags_as_text(tok):
    ids = build_input_ids(tok, SINGLE, [])
    assert ids == tok.encode(SINGLE) and min(ids) >= 0 and ids.count(1) == 1
    assert tok.decode(ids) .startswith("\n<|image_1|>")


@pytest.mark.parametrize("prompt, n, needle", [
    ("<|user|>\nHi<|end|>\n<|assistant|>\n", [5], "<|image_1|>"),
    ("<|image_0|>\nHi", [5], "numbered from"),
    ("<|image_1|><|image_3|>", [5, 5], "without gaps"),
    ("<|image_1|><|image_2|><|image_3|>", [5, 5], "3 image tag(s) but 2 image(s)"),
    ("<|image_1|>", [5, 5], "1 image tag(s) but 2 image(s)"),
    ("<|image_1|> and again <|image_1|>", [5], "more than once"),
    ("<|image_1|><|image_2|><|image_1|>", [5, 5], "more than once"),
    ("<|image_2|>\n<|image_1|>\n", [5, 5], "<|image_2|> comes before <|image_1|>"),
])  # fmt: skip
def test_tag_validation(tok, prompt, n, needle):
    with pytest.raises(Phi3VError) as e:
        build_input_ids(tok, prompt, n)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and isinstance(e.value, ValueError)


def test_image_tag_regex():
    assert IMAGE_TAG.findall("<|image_1|>x<|image_12|><|image|><|image_a|>") == ["1", "12"]


# --- chat_prompt -------------------------------------------------------------------------------------------


def test_chat_prompt_text_only_and_system():
    prompt, images = chat_prompt([{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert prompt == "<|system|>\nS<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n" and images == []


def test_chat_prompt_one_image_gives_canonical_prompt(tok):
    img = object()
    prompt, images = chat_prompt([{"role": "user", "content": [
        {"type": "image", "image": img}, {"type": "text", "text": "What is shown in this image?"}]}])  # fmt: skip
    assert prompt == SINGLE and images == [img]
    assert len(build_input_ids(tok, prompt, [1921])) == 1939


def test_chat_prompt_numbering_continues_across_turns():
    msgs = [
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "image_url", "image_url": {"url": "b.png"}},
                                     {"type": "image_url", "image_url": "data:c"}, {"type": "text", "text": "these?"}]},
    ]  # fmt: skip
    prompt, images = chat_prompt(msgs)
    assert images == ["a.png", "b.png", "data:c"]
    assert prompt == ("<|user|>\n<|image_1|>\nDescribe.<|end|>\n<|assistant|>\nA cat.<|end|>\n"
                      "<|user|>\nAnd <|image_2|>\n<|image_3|>\nthese?<|end|>\n<|assistant|>\n")  # fmt: skip


def test_chat_prompt_leaves_caller_tags_alone():
    prompt, images = chat_prompt([{"role": "user", "content": "<|image_1|>\nWhat is shown in this image?"}])
    assert prompt == SINGLE and images == []


@pytest.mark.parametrize("messages, needle", [
    ([], "non-empty"),
    ("hello", "non-empty"),
    (["hello"], "must be a dict"),
    ([{"role": "tool", "content": "x"}], "role 'tool'"),
    ([{"content": "x"}], "role None"),
    ([{"role": "user", "content": None}], "content is a NoneType"),
    ([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], "type 'audio'"),
    ([{"role": "user", "content": ["just a string"]}], "type None"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "non-string text"),
    ([{"role": "user", "content": [{"type": "image"}]}], "no 'image' key"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "without a url"),
])  # fmt: skip
def test_chat_prompt_bad_inputs(messages, needle):
    with pytest.raises(Phi3VError) as e:
        chat_prompt(messages)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_apply_chat_template_bad_inputs(tok):
    for msgs in ([], [{"role": "user", "content": [{"type": "text", "text": "x"}]}]):
        with pytest.raises(Phi3VError) as e:
            tok.apply_chat_template(msgs)
        assert "\n" not in str(e.value)


# --- StreamDecoder (§6.5) ---------------------------------------------------------------------------------

STREAM_TEXTS = [
    "Hello world! This is a test.",
    " leading space and  double  spaces",
    "café naïve résumé Ærøskøbing",
    "日本語のテキスト、中文文本。",
    "emoji 🤗🎉 mixed 👩‍👩‍👧 done 🦜",
    "line one\nline two\n\n  indented\ttab",
    "<|user|>\n<|image_1|>\nWhat is this?<|end|>\n<|assistant|>\n A 🐈 on a mat.<|end|><|endoftext|>",
    "\n starts with newline",
    "🤗",
]


def _stream(tokenizer, ids, skip=True):
    d = StreamDecoder(tokenizer, skip_special_tokens=skip)
    deltas = [d.push(i) for i in ids]
    return deltas, deltas + [d.flush()]


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_stream_matches_decode(tok, text, skip):
    for ids in (tok.encode(text), tok.encode(text, add_bos=False)):
        deltas, all_ = _stream(tok, ids, skip)
        assert "".join(all_) == tok.decode(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in d for d in all_)
        assert "".join(all_) == "".join(deltas)  # nothing left for flush when the text is complete


def test_stream_byte_fallback_one_at_a_time(tok):
    bytes_ = "é🤗€".encode()
    ids = [tok.token_to_id(f"<0x{b:02X}>") for b in bytes_]
    assert None not in ids
    deltas, all_ = _stream(tok, ids)
    assert deltas == ["", "é", "", "", "", "🤗", "", "", "€"]
    assert all_[-1] == "" and "".join(all_) == tok.decode(ids) == "é🤗€"


def test_stream_truncated_character_flushes_like_decode(tok):
    ids = tok.encode("ok 🤗", add_bos=False)[:-2]  # cut inside the emoji's byte run
    deltas, all_ = _stream(tok, ids)
    assert "\ufffd" not in "".join(deltas) and "\ufffd" in all_[-1]
    assert "".join(all_) == tok.decode(ids)


def test_stream_ignores_placeholders_and_padding_ids(tok):
    ids = [-1, -1, *tok.encode("hi there", add_bos=False), 32044 + 5, -3]
    assert "".join(_stream(tok, ids)[1]) == tok.decode(ids) == "hi there"


def test_stream_random_tokens_match_decode(tok):
    # Random non-byte tokens (whole pieces, specials included) exercise the window's leading-space handling.
    rng = random.Random(0)
    pool = [i for i in range(tok.vocab_size) if not tok.id_to_token(i).startswith("<0x")]
    pool += [tok.token_to_id(t) for t in ("▁", "<|end|>", "<|user|>", "<s>")] * 200
    for _ in range(30):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
        for skip in (True, False):
            assert "".join(_stream(tok, ids, skip)[1]) == tok.decode(ids, skip_special_tokens=skip)


def test_stream_other_tokenizer(tmp_path):
    t = _byte_tokenizer(tmp_path)
    text = "<|user|>\n héllo 🤗\n<|end|>\n"
    ids = t.encode(text)
    deltas, all_ = _stream(t, ids)
    assert "".join(all_) == t.decode(ids) and all("\ufffd" not in d for d in all_)
