"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client."""

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from PIL import Image

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint, *extra):
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "phi3v", "serve", "--model", str(checkpoint), "--port", str(port),
                          "--dtype", "float32", *map(str, extra)], stderr=subprocess.PIPE, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.loads(r.read())["status"] == "ready":
                    return p, url
        except (OSError, ValueError):
            time.sleep(0.2)
    p.kill()
    raise RuntimeError("server did not become ready: " + p.stderr.read())


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    Image.new("RGB", (300, 200), "green").save(allowed / "ok.png")
    p, url = start_server(tiny_checkpoint, "--allowed-local-dir", allowed, "--max-images", "3",
                          "--max-image-bytes", "200000", "--max-pixels", "4000000", "--max-new-tokens", "64",
                          "--max-batch", "32", "--max-queue", "64")  # fmt: skip
    yield url, allowed
    p.terminate()
    p.wait(timeout=30)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def data_uri(colour="red", size=(320, 240), fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(*urls, text="What is in the image?"):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def test_plain_chat_with_usage(client):
    r = client.chat.completions.create(model="phi3v", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_equals_plain(client):
    msgs = image_message(data_uri("blue"))
    plain = client.chat.completions.create(model="phi3v", messages=msgs, max_tokens=12, seed=1)
    chunks = list(client.chat.completions.create(model="phi3v", messages=msgs, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_two_images_and_file_url(client, server):
    _, allowed = server
    two = client.chat.completions.create(model="phi3v", messages=image_message(data_uri("red"), data_uri("blue")),
                                         max_tokens=4)  # fmt: skip
    assert two.usage.prompt_tokens > 2 * 400  # both images' tokens are in the prompt
    local = client.chat.completions.create(model="phi3v", messages=image_message(f"file://{allowed / 'ok.png'}"),
                                           max_tokens=4)  # fmt: skip
    assert local.usage.prompt_tokens > 400


def test_models_and_health(server):
    url, _ = server
    with urllib.request.urlopen(url + "/v1/models") as r:
        assert json.loads(r.read())["data"][0]["object"] == "model"
    with urllib.request.urlopen(url + "/health") as r:
        assert json.loads(r.read())["status"] == "ready"


def post(url, body, headers=None, raw=None):
    h = {"content-type": "application/json", **(headers or {})}
    r = httpx.post(url + "/v1/chat/completions", content=raw if raw is not None else json.dumps(body), headers=h,
                   timeout=60)  # fmt: skip
    return r.status_code, r.json()


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (None, 400, "not valid JSON"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "robot"),
        ({"messages": image_message("data:image/png;base64,@@@")}, 400, "base64"),
        ({"messages": image_message("data:image/png;base64," + base64.b64encode(b"not an image").decode())}, 400, "image"),
        ({"messages": image_message("https://example.com/x.png")}, 400, "remote image URLs are disabled"),
        ({"messages": image_message("file:///etc/passwd")}, 400, "outside the allowed"),
        ({"messages": image_message(*[data_uri()] * 4)}, 400, "limit is 3"),
        ({"messages": [{"role": "user", "content": "<|image_1|> hi"}]}, 400, "image"),
        ({"messages": image_message(data_uri(size=(2200, 2000)))}, 413, "pixels"),
        ({"messages": image_message(data_uri(size=(900, 900), fmt="BMP"))}, 413, "limit"),
        ({"messages": USER, "max_tokens": 0}, 422, "max_tokens"),
        ({"messages": USER, "max_tokens": 100000}, 422, "max_tokens"),
        ({"messages": USER, "temperature": -1}, 422, "temperature"),
        ({"messages": USER, "top_p": 2}, 422, "top_p"),
        ({"messages": USER, "n": 2}, 422, "n=1"),
        ({"messages": USER, "stop": 5}, 422, "stop"),
        ({"messages": USER, "num_crops": 0}, 422, "num_crops"),
    ],
)
def test_error_statuses(server, body, status, needle):
    code, out = post(server[0], body, raw=b"{nope" if body is None else None)
    assert code == status, out
    assert needle in out["error"]["message"] and out["error"]["type"]


def test_context_too_long_is_400_and_server_survives(server, tiny_checkpoint):
    p, url = start_server(tiny_checkpoint, "--max-prompt-tokens", "100")
    try:
        code, out = post(url, {"messages": image_message(data_uri())})
        assert code == 400 and "allows 100" in out["error"]["message"]
        code, _ = post(url, {"messages": USER, "max_tokens": 2})
        assert code == 200
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_api_key(tiny_checkpoint):
    p, url = start_server(tiny_checkpoint, "--api-key", "s3cret")
    try:
        assert post(url, {"messages": USER, "max_tokens": 2})[0] == 401
        assert post(url, {"messages": USER, "max_tokens": 2}, {"authorization": "Bearer wrong"})[0] == 401
        ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model="phi3v", messages=USER, max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_queue_full_is_429(tiny_checkpoint):
    p, url = start_server(tiny_checkpoint, "--max-batch", "1", "--max-queue", "1")
    try:
        long = {"messages": USER, "max_tokens": 400, "ignore_eos": True}  # long enough to keep the row busy
        results = []
        threads = [threading.Thread(target=lambda: results.append(post(url, long)[0])) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert 429 in results and 200 in results
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_32_concurrent_streaming_clients_equal_alone(client, server):
    """Load test (loopback, bounded): every stream completes and equals the same request run alone."""
    prompts = [f"Tell me about the number {i}." for i in range(32)]
    alone = [client.chat.completions.create(model="phi3v", messages=[{"role": "user", "content": q}],
                                            max_tokens=16).choices[0].message.content for q in prompts[:8]]  # fmt: skip
    out = [None] * 32

    def run(i):
        c = openai.OpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0, timeout=120)
        stream = c.chat.completions.create(model="phi3v", messages=[{"role": "user", "content": prompts[i]}],
                                           max_tokens=16, stream=True)  # fmt: skip
        parts, finish = [], None
        for ch in stream:
            if ch.choices:
                parts.append(ch.choices[0].delta.content or "")
                finish = ch.choices[0].finish_reason or finish
        out[i] = ("".join(parts), finish)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert time.time() - t0 < 180
    assert all(o is not None and o[1] in ("stop", "length") for o in out), out
    assert [o[0] for o in out[:8]] == alone
    with urllib.request.urlopen(server[0] + "/health") as r:
        health = json.loads(r.read())
    assert health["status"] == "ready" and health["active"] == 0


def test_disconnected_client_frees_its_row(server):
    url, _ = server
    with httpx.stream("POST", url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 64, "stream": True},
                      timeout=60) as r:  # fmt: skip
        for line in r.iter_lines():
            if '"content"' in line and '""' not in line:
                break  # hang up mid-stream
    deadline = time.time() + 20
    while time.time() < deadline:
        with urllib.request.urlopen(url + "/health") as r:
            if json.loads(r.read())["active"] == 0:
                return
        time.sleep(0.1)
    pytest.fail("the disconnected request kept its row")
