"""Tokenizer, chat template, image-tag expansion and streaming detokenization (spec §6).

Built on the HF `tokenizers` library and the checkpoint's own tokenizer.json. No special-token id is
hard-coded: each is looked up by its string, because other checkpoints reuse the strings with other ids.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from phi3v.errors import Phi3VError

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
ROLES = ("system", "user", "assistant")


def _token_string(value: Any, default: str) -> str:
    # tokenizer_config.json stores special tokens either as plain strings or as serialized AddedTokens.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else default


def _clean_up_spaces(text: str) -> str:
    # The same replacements as HF's `clean_up_tokenization`; off by default for Phi-3 (spec §6.1).
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(a, b)
    return text


def render_chat(messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The Phi-3 chat template (spec §6.2): no BOS, no EOS; a trailing `<|assistant|>\\n` on request."""
    if not messages:
        raise Phi3VError("the messages list is empty; give at least one {'role': 'user', 'content': ...} message")
    text = ""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise Phi3VError(
                f"message {i} must be a dict with string 'role' and 'content'; use chat_prompt for image parts"
            )
        text += "<|" + m["role"] + "|>\n" + m["content"] + "<|end|>\n"
    if add_generation_prompt and messages[-1]["role"] != "assistant":
        text += "<|assistant|>\n"
    return text


class Tokenizer:
    """A Phi-3 tokenizer: `tokenizers.Tokenizer` plus the special ids and the chat template (spec §6.1)."""

    def __init__(
        self, tok: tokenizers.Tokenizer, bos: str = "<s>", eos: str = "<|endoftext|>", pad: str = "<|endoftext|>"
    ):
        self.tok = tok
        self.bos_token_id = self._special(bos)
        self.eos_token_id = self._special(eos)
        self.pad_token_id = self._special(pad)
        self.end_token_id = self._special("<|end|>")
        # Stop on <|end|> and <|endoftext|> (spec §6.5), never on the stale `eos_token_id: 2` of config.json.
        self.stop_token_ids: frozenset[int] = frozenset({self.end_token_id, self._special("<|endoftext|>")})
        # Ids the tokenizer defines; the model's embedding has padding rows beyond these (spec §6.5).
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, taking bos/eos/pad strings from `tokenizer_config.json` if present (spec §6.1)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise Phi3VError(f"no tokenizer.json in {path}; point at a Phi-3-Vision checkpoint folder")
        cfg: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        return cls(
            tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")),
            bos=_token_string(cfg.get("bos_token"), "<s>"),
            eos=_token_string(cfg.get("eos_token"), "<|endoftext|>"),
            pad=_token_string(cfg.get("pad_token"), "<|endoftext|>"),
        )

    def _special(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise Phi3VError(f"the tokenizer has no {token} token; use a Phi-3-Vision checkpoint's tokenizer.json")
        return i

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; with `add_bos` the post-processor prepends BOS, else no special token is added."""
        return self.tok.encode(text, add_special_tokens=add_bos).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool = False) -> str:  # fmt: skip
        """Text of `ids`, dropping image placeholders (< 0) and padding-vocab ids (>= vocab_size) (spec §6.5)."""
        valid = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        text = self.tok.decode(valid, skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if clean_up_tokenization_spaces else text

    def batch_decode(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True,
                     clean_up_tokenization_spaces: bool = False) -> list[str]:  # fmt: skip
        """`decode` for each row, as in HF's `batch_decode`."""
        return [self.decode(ids, skip_special_tokens, clean_up_tokenization_spaces) for ids in batch]

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str | list[int]:  # fmt: skip
        """The shipped chat template (spec §6.2) in Python; with `tokenize`, the ids of `encode(text)`."""
        text = render_chat(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text


def _check_tags(tags: list[int], n_images: int) -> None:
    """Tags must be <|image_1|>..<|image_K|>, each once, in increasing order, K = number of images (spec §8.4)."""
    if not tags:
        raise Phi3VError(f"{n_images} image(s) were given but the prompt has no image tag; "
                         "put <|image_1|> in the prompt where the image goes")  # fmt: skip
    if min(tags) < 1:
        raise Phi3VError(f"<|image_{min(tags)}|> is not a valid tag; image tags are numbered from <|image_1|>")
    dup = next((t for i, t in enumerate(tags) if t in tags[:i]), None)
    if dup is not None:
        raise Phi3VError(f"<|image_{dup}|> appears more than once; use each image tag exactly once, one per image")
    bad = next((i for i in range(1, len(tags)) if tags[i] < tags[i - 1]), None)
    if bad is not None:
        raise Phi3VError(f"<|image_{tags[bad - 1]}|> comes before <|image_{tags[bad]}|>; "
                         "write the tags in increasing order, matching the order of the images")  # fmt: skip
    if tags != list(range(1, len(tags) + 1)):
        numbers = ", ".join(map(str, tags))
        raise Phi3VError(f"the image tags are numbered {numbers}; number them 1..{len(tags)} without gaps")
    if len(tags) != n_images:
        raise Phi3VError(f"the prompt has {len(tags)} image tag(s) but {n_images} image(s) were given; "
                         "use one <|image_N|> tag per image")  # fmt: skip


def build_input_ids(tokenizer: Tokenizer, prompt: str, num_img_tokens: Sequence[int]) -> list[int]:
    """Expand `<|image_k|>` tags into runs of `-k` (spec §6.3, §9).

    Each text chunk is tokenized separately WITH BOS, so a BOS follows every image run and an empty first
    chunk becomes [bos] (spec §8.5: the trained format). Without images the tags stay ordinary text.
    """
    if len(num_img_tokens) == 0:
        return tokenizer.encode(prompt)
    _check_tags([int(t) for t in IMAGE_TAG.findall(prompt)], len(num_img_tokens))
    pieces = IMAGE_TAG.split(prompt)  # text, number, text, number, ..., text (the group is captured)
    ids = tokenizer.encode(pieces[0])
    for k, text in zip(pieces[1::2], pieces[2::2]):
        ids += [-int(k)] * int(num_img_tokens[int(k) - 1])
        ids += tokenizer.encode(text)
    return ids


def _image_of(part: dict[str, Any], where: str) -> Any:
    if part["type"] == "image":
        if "image" not in part:
            raise Phi3VError(f"{where} has type 'image' but no 'image' key; give {{'type': 'image', 'image': ...}}")
        return part["image"]
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str):
        raise Phi3VError(f"{where} has type 'image_url' without a url; "
                         "give {'type': 'image_url', 'image_url': {'url': ...}}")  # fmt: skip
    return url


def chat_prompt(messages: Sequence[dict[str, Any]]) -> tuple[str, list[Any]]:
    """OpenAI-style messages -> (Phi-3 prompt with generation prompt, images in order) (spec §6.2, §6.3).

    Image parts become `<|image_N|>\\n` in place, numbered across the whole conversation. Tags written by
    the caller inside plain-string content are left alone; `build_input_ids` validates them.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise Phi3VError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    images: list[Any] = []
    flat: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise Phi3VError(f"message {i} is a {type(m).__name__}; "
                             "each message must be a dict with 'role' and 'content'")  # fmt: skip
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise Phi3VError(f"message {i} has role {role!r}; use one of {', '.join(ROLES)}")
        if isinstance(content, str):
            flat.append({"role": role, "content": content})
            continue
        if not isinstance(content, (list, tuple)):
            raise Phi3VError(f"message {i} content is a {type(content).__name__}; give a string or a list of parts")
        text = ""
        for j, part in enumerate(content):
            where = f"message {i} part {j}"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise Phi3VError(f"{where} has non-string text; give {{'type': 'text', 'text': '...'}}")
                text += part["text"]
            elif kind in ("image", "image_url"):
                images.append(_image_of(part, where))
                text += f"<|image_{len(images)}|>\n"
            else:
                raise Phi3VError(f"{where} has type {kind!r}; use 'text', 'image' or 'image_url'")
        flat.append({"role": role, "content": text})
    return render_chat(flat, add_generation_prompt=True), images


class StreamDecoder:
    """Incremental detokenizer: deltas from `push` plus `flush()` equal `tokenizer.decode(all ids)` (spec §6.5).

    It decodes a window of recent tokens and diffs it against the window's already-emitted prefix, like
    vLLM. The window's prefix must decode to non-empty text (or start at token 0): the SentencePiece decoder
    strips one leading space from whatever it decodes, and that strip must land on already-emitted text.
    Exact for valid UTF-8; a byte run that turns invalid after a complete character decodes as a block of
    U+FFFD in `decode`, while the stream has already sent that character.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids[:read] are emitted; ids[prefix:read] decode to self.prefix_text
        self.prefix_text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty, never a partial character)."""
        token_id = int(token_id)
        if not 0 <= token_id < self.tokenizer.vocab_size:
            return ""  # decode drops these too
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return any held-back text (e.g. an incomplete byte sequence, decoded as U+FFFD like `decode`)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        text = self._decode(self.ids[self.prefix :])
        # Byte-fallback tokens can split a character: hold back until it is complete (or the stream ends).
        if text.endswith("\ufffd") and not final:
            return ""
        if not text.startswith(self.prefix_text):
            # Not expected for a concatenative decoder; fall back to decoding from the start to stay exact.
            self.prefix, self.prefix_text = 0, self._decode(self.ids[: self.read])
            text = self._decode(self.ids)
        # Normally the whole prefix_text; less only for invalid UTF-8 byte runs, which decode as a block.
        delta = text[len(os.path.commonprefix([self.prefix_text, text])) :]
        # Slide the window to the just-emitted tokens only if they decode to something (see class doc).
        recent = self._decode(self.ids[self.read :])
        if recent:
            self.prefix, self.prefix_text = self.read, recent
        else:
            self.prefix_text = text
        self.read = len(self.ids)
        return delta
