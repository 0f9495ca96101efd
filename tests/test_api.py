"""User errors through the Python API: one exception type, one line that says what to fix."""

import io

import pytest
from PIL import Image

import phi3v
from phi3v.api import Phi3V, pick_device
from phi3v.checkpoint import random_model
from phi3v.prompt import Tokenizer

from .conftest import crossing_config


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return phi3v.load(tiny_checkpoint, device="cpu", dtype="float32")


def png_bytes(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "blue").save(buf, "PNG")
    return buf.getvalue()


def one_line_error(fn, match):
    with pytest.raises(phi3v.Phi3VError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def user(text):
    return [{"role": "user", "content": text}]


def test_images_as_path_pil_and_bytes_agree(tiny, tmp_path):
    data = png_bytes()
    (tmp_path / "a.png").write_bytes(data)
    answers = {tiny.chat("Colour?", images=[src], max_new_tokens=5)
               for src in (tmp_path / "a.png", str(tmp_path / "a.png"), data, Image.open(io.BytesIO(data)))}  # fmt: skip
    assert len(answers) == 1


@pytest.mark.parametrize(
    "text, n_images, match",
    [
        ("<|image_2|>\nWhat?", 1, "numbered 2; number them 1"),
        ("<|image_0|>\nWhat?", 1, "image_0"),
        ("<|image_1|>\n<|image_1|>\nWhat?", 1, "more than once"),
        ("<|image_2|>\n<|image_1|>\nWhat?", 2, "order"),
        ("<|image_1|>\nWhat?", 2, "2 image"),
        ("<|image_1|>\n<|image_2|>\nWhat?", 1, "1 image"),
        ("<|image_1|>\nWhat?", 0, "no images"),
        ("What?", 1, "<|image_1|>"),
    ],
)
def test_bad_tags(tiny, text, n_images, match):
    """Spec §6.3 step 3 and pitfall 4: tags numbered 1..K, once each, in order, one per image."""
    one_line_error(lambda: tiny.chat(user(text), images=[png_bytes()] * n_images, max_new_tokens=1), match)


def test_explicit_tags_with_images_argument(tiny):
    """Notebook-style content with tags written by the caller, images given alongside."""
    a = tiny.chat(user("<|image_1|>\nWhat?"), images=[png_bytes()], max_new_tokens=4)
    b = tiny.chat([{"role": "user", "content": [{"type": "image", "image": png_bytes()}, {"type": "text", "text": "What?"}]}],
                  max_new_tokens=4)  # fmt: skip
    assert a == b


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "missing.png", "missing.png"),
        (lambda p: (p / "empty.png").write_bytes(b"") and p / "empty.png" or p / "empty.png", "empty"),
        (lambda p: (p / "half.png").write_bytes(png_bytes((300, 300))[:200]) and p / "half.png", "half.png"),
        (lambda p: (p / "notes.txt").write_text("not an image") and p / "notes.txt", "notes.txt"),
    ],
)
def test_bad_images(tiny, tmp_path, make, match):
    one_line_error(lambda: tiny.chat("What is it?", images=[make(tmp_path)]), match)


def test_decompression_bomb_is_refused(tiny, tmp_path):
    from phi3v.image_processor import load_image

    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)  # 400 MP, a few KB on disk
    one_line_error(lambda: load_image(path), "pixels")
    one_line_error(lambda: tiny.chat("What?", images=[path]), "pixels")


def test_prompt_longer_than_context(tokenizer_dir):
    model = Phi3V(random_model(crossing_config(32)), Tokenizer.from_dir(tokenizer_dir), num_crops=4)
    assert model.model.config.text.max_position_embeddings == 1024
    one_line_error(lambda: model.chat("Compare.", images=[png_bytes(), png_bytes()]), "context")


def test_bad_options_and_messages(tiny):
    one_line_error(lambda: tiny.chat("hi", temperature=-1), "temperature")
    one_line_error(lambda: tiny.chat("hi", top_p=0), "top_p")
    one_line_error(lambda: tiny.chat("hi", max_new_tokens=0), "max_new_tokens")
    one_line_error(lambda: tiny.chat([{"role": "robot", "content": "hi"}]), "robot")
    one_line_error(lambda: tiny.chat([]), "message")
    one_line_error(lambda: pick_device("tpu"), "device")
    one_line_error(lambda: phi3v.load("/no/such/folder"), "does not exist")


def test_auto_dtype(monkeypatch):
    """bf16 on GPUs and bf16-capable CPUs; float32 on other CPUs when it fits in memory."""
    import torch

    import phi3v.api as api

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(api, "cpu_has_fast_bf16", lambda: True)
    assert api.pick_dtype("auto", cpu, 8 << 30) == torch.bfloat16
    monkeypatch.setattr(api, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(api, "available_memory", lambda: 64 << 30)
    assert api.pick_dtype("auto", cpu, 8 << 30) == torch.float32
    assert api.pick_dtype(None, cuda, 8 << 30) == torch.bfloat16
    monkeypatch.setattr(api, "available_memory", lambda: 24 << 30)  # this machine class, idle
    assert api.pick_dtype("auto", cpu, int(8.3e9)) == torch.float32  # 15.5 GiB of float32 + 2 GiB fits
    monkeypatch.setattr(api, "available_memory", lambda: 17 << 30)
    assert api.pick_dtype("auto", cpu, int(8.3e9)) == torch.bfloat16  # float32 would not fit
    assert api.pick_dtype("fp16", cpu) == torch.float16


def test_kv_dtype(tiny_checkpoint):
    """auto: a bf16 cache for quantized models computing in float32 on the CPU, else the compute dtype."""
    import torch

    import phi3v.api as api

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert api.pick_kv_dtype("auto", torch.float32, cpu, "int4") == torch.bfloat16
    assert api.pick_kv_dtype(None, torch.float32, cpu, "int8") == torch.bfloat16
    assert api.pick_kv_dtype("auto", torch.float32, cpu, None) == torch.float32
    assert api.pick_kv_dtype("auto", torch.bfloat16, cpu, "int4") == torch.bfloat16
    assert api.pick_kv_dtype("auto", torch.float16, cuda, "int4") == torch.float16
    assert api.pick_kv_dtype("float32", torch.float32, cpu, "int4") == torch.float32
    assert phi3v.load(tiny_checkpoint, device="cpu", dtype="float32", quantize="int8").model.cache_dtype == torch.bfloat16
    one_line_error(lambda: phi3v.load(tiny_checkpoint, device="cpu", kv_dtype="int8"), "kv_dtype")


def test_data_uri_and_image_url_parts(tiny):
    """OpenAI-style image_url parts work from Python too (data: URIs here; http(s) is fetched likewise)."""
    import base64

    data = png_bytes()
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "Hi"}]}]
    assert tiny.chat(msg, max_new_tokens=4) == tiny.chat("Hi", images=[data], max_new_tokens=4)
