"""The `phi3v` command as a subprocess on a tiny checkpoint: success paths, --json, streaming, batch and
--resume, and the one-line user errors with their exit codes."""

import base64
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from phi3v.presets import parse_json_object

GEN = ["--max-new-tokens", "6"]


def phi3v(*args, model=None, stdin=None, timeout=300):
    env = dict(os.environ)
    if model is not None:
        env["PHI3V_MODEL"] = str(model)
    if isinstance(stdin, str):
        stdin = stdin.encode()
    r = subprocess.run([sys.executable, "-m", "phi3v", *map(str, args)], capture_output=True, timeout=timeout,
                       env=env, input=stdin)  # fmt: skip
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


@pytest.fixture(scope="module")
def pics(tmp_path_factory):
    d = tmp_path_factory.mktemp("pics")
    for i, colour in enumerate(["red", "green", "blue", "yellow", "white", "black"]):
        Image.new("RGB", (200 + 40 * i, 150), colour).save(d / f"img{i}.png")
    return d


def assert_user_error(r, code, message):
    assert r.returncode == code, r.stderr
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_ask_streams_plain_text(tiny_checkpoint, pics):
    r = phi3v("ask", pics / "img0.png", pics / "img1.png", "-p", "Compare.", *GEN, "-q", model=tiny_checkpoint)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and r.stderr == ""


def test_json_schema_and_same_answer(tiny_checkpoint, pics):
    plain = phi3v("describe", pics / "img2.png", *GEN, "-q", model=tiny_checkpoint)
    r = phi3v("describe", pics / "img2.png", *GEN, "--json", model=tiny_checkpoint)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) >= {"answer", "model", "finish_reason", "prompt_tokens", "completion_tokens", "seconds",
                        "time_to_first_token", "decode_tokens_per_second", "images"}  # fmt: skip
    assert out["answer"] == plain.stdout[:-1]
    assert out["prompt_tokens"] > 700 and 1 <= out["completion_tokens"] <= 6


def test_streaming_output_arrives_before_the_end(tiny_checkpoint, pics):
    env = dict(os.environ, PHI3V_MODEL=str(tiny_checkpoint))
    p = subprocess.Popen([sys.executable, "-m", "phi3v", "ask", str(pics / "img0.png"), "-p", "Tell me everything.",
                          "--max-new-tokens", "3000", "--ignore-eos", "-q"], stdout=subprocess.PIPE, env=env)  # fmt: skip
    try:
        first = p.stdout.read1(64)
        assert first and p.poll() is None  # text came while generation was still running
    finally:
        p.kill()
        p.wait()


def test_stdin_image_and_local_url(tiny_checkpoint, pics):
    data = (pics / "img3.png").read_bytes()
    a = phi3v("ask", "-", "-p", "What?", *GEN, "-q", "--json", model=tiny_checkpoint, stdin=data)
    assert a.returncode == 0, a.stderr

    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(pics))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/img3.png"
        b = phi3v("ask", url, "-p", "What?", *GEN, "-q", "--json", model=tiny_checkpoint)
        missing = phi3v("ask", url.replace("img3", "nope"), "-p", "What?", model=tiny_checkpoint)
    finally:
        server.shutdown()
    assert b.returncode == 0, b.stderr
    assert json.loads(a.stdout)["answer"] == json.loads(b.stdout)["answer"]
    assert_user_error(missing, 1, "HTTP 404")


def test_compare_and_ocr(tiny_checkpoint, pics):
    r = phi3v("compare", pics / "img0.png", pics / "img1.png", pics / "img2.png", *GEN, "-q", model=tiny_checkpoint)
    assert r.returncode == 0, r.stderr
    for fmt in ("text", "markdown"):
        assert phi3v("ocr", pics / "img4.png", "--format", fmt, *GEN, "-q", model=tiny_checkpoint).returncode == 0
    # random weights never write JSON: one retry, then a clear error
    r = phi3v("ocr", pics / "img4.png", "--format", "json", *GEN, model=tiny_checkpoint)
    assert_user_error(r, 1, "valid JSON object twice")
    assert "asking once more" in r.stderr


def test_parse_json_object():
    assert parse_json_object('{"text": "a"}') == {"text": "a"}
    assert parse_json_object('Here:\n```json\n{"text": "b", "lines": ["b"]}\n```') == {"text": "b", "lines": ["b"]}
    assert parse_json_object('noise {"text": "c"} tail') == {"text": "c"}
    assert parse_json_object("[1, 2]") is None and parse_json_object("no json") is None


def test_chat_session(tiny_checkpoint, pics):
    script = f"hello\n/image {pics / 'img0.png'}\nwhat is this?\n/image {pics / 'nope.png'}\n/bogus\n/reset\nagain\n/quit\n"
    r = phi3v("chat", "--image", pics / "img1.png", *GEN, model=tiny_checkpoint, stdin=script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 3  # three answers
    assert "attached" in r.stderr and "nope.png" in r.stderr and "conversation cleared" in r.stderr


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["ask", "missing.png", "-p", "hi"], 2, "missing.png: no such file"),
        (["ask", "{pics}/img0.png", "-p", "<|image_1|>\n<|image_2|> hi"], 1, "image"),
        (["ask", "{pics}/img0.png", "-p", "hi", "--no-such-flag"], 2, "No such option"),
        (["ask", "http://127.0.0.1:9/x.png", "-p", "hi"], 1, "could not fetch http://127.0.0.1:9/x.png"),
        (["ask", "{pics}/img0.png"], 2, "Missing option '--prompt'"),
        (["compare", "{pics}/img0.png"], 2, "at least two images"),
        (["describe", "{pics}/img0.png", "--device", "tpu"], 1, "device"),
        (["describe", "{pics}/img0.png", "--model", "/no/such/ckpt"], 1, "does not exist"),
        (["describe", "{pics}/img0.png", "--temperature", "-1"], 2, "temperature"),
        (["frobnicate"], 2, "No such command"),
        (["make-checkpoint"], 2, "Missing argument"),
    ],
)
def test_user_errors(tiny_checkpoint, pics, args, code, message):
    r = phi3v(*[a.format(pics=pics) for a in args], model=tiny_checkpoint)
    assert_user_error(r, code, message)
    if code == 1:
        assert r.stderr.strip().splitlines()[-1].startswith("error: ")


def test_default_model_missing_says_how_to_get_it(tmp_path, pics):
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE="1")
    env.pop("PHI3V_MODEL", None)
    r = subprocess.run([sys.executable, "-m", "phi3v", "describe", str(pics / "img0.png")], capture_output=True,
                       text=True, env=env)  # fmt: skip
    assert_user_error(r, 1, "huggingface-cli download microsoft/Phi-3.5-vision-instruct")


def test_help_has_examples():
    for cmd in ("ask", "describe", "ocr", "compare", "chat", "batch", "make-checkpoint", "demo"):
        r = phi3v(cmd, "--help")
        assert r.returncode == 0 and "Example:" in r.stdout, cmd


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_batch_folder_with_bad_files(tiny_checkpoint, pics, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes((pics / "img0.png").read_bytes())
    (folder / "c_corrupt.png").write_bytes((pics / "img1.png").read_bytes()[:100])
    (folder / "d_notes.txt").write_text("not an image")
    out = tmp_path / "out.jsonl"
    r = phi3v("batch", folder, "-p", "What?", "-o", out, "--batch-size", "2", *GEN, model=tiny_checkpoint)
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(out)
    assert [Path(x["input"]).name for x in rows] == ["a.png", "b.png", "c_corrupt.png", "d_notes.txt"]
    assert "answer" in rows[0] and rows[0]["answer"] == rows[1]["answer"]
    assert "error" in rows[2] and "error" in rows[3] and "answer" not in rows[2]
    assert "2 errors" in r.stderr
    again = phi3v("batch", folder, "-p", "What?", "-o", out, model=tiny_checkpoint)
    assert_user_error(again, 2, "--resume")


def test_batch_jsonl_input(tiny_checkpoint, pics, tmp_path):
    src = tmp_path / "jobs.jsonl"
    src.write_text("\n".join([json.dumps({"image": str(pics / "img0.png"), "prompt": "Colour?"}),
                              json.dumps({"images": [str(pics / "img0.png"), str(pics / "img1.png")]}),
                              "not json"]) + "\n")  # fmt: skip
    out = tmp_path / "out.jsonl"
    r = phi3v("batch", src, "-p", "Default?", "-o", out, *GEN, model=tiny_checkpoint)
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(out)
    assert rows[0]["prompt"] == "Colour?" and rows[1]["prompt"] == "Default?" and len(rows[1]["input"]) == 2
    assert "error" in rows[2]


def test_batch_resume_after_interrupt(tiny_checkpoint, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(40):  # enough work that the interrupt lands mid-run
        Image.new("RGB", (100 + 10 * i, 80), (6 * i, 100, 200)).save(folder / f"{i:02d}.png")
    args = ["batch", str(folder), "-p", "Describe.", "--batch-size", "3", "--max-new-tokens", "160", "--ignore-eos"]
    full = tmp_path / "full.jsonl"
    assert phi3v(*args, "-o", full, "-q", model=tiny_checkpoint).returncode == 0

    out = tmp_path / "cut.jsonl"
    env = dict(os.environ, PHI3V_MODEL=str(tiny_checkpoint))
    # Ctrl-C must reach the child even if something in this test process set SIGINT to "ignore"
    # (an ignored SIGINT is inherited, and Python then installs no KeyboardInterrupt handler).
    p = subprocess.Popen([sys.executable, "-m", "phi3v", *args, "-o", str(out), "-q"], env=env,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 1):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    first = read_jsonl(out)
    assert p.returncode == 130 and "--resume" in err
    assert 1 <= len(first) < 40, "interrupt came too late to test resuming"

    r = phi3v(*args, "-o", out, "--resume", model=tiny_checkpoint)
    assert r.returncode == 0, r.stderr
    rows = read_jsonl(out)
    assert rows[: len(first)] == first  # nothing already written was lost or rewritten
    assert [x["input"] for x in rows] == [x["input"] for x in read_jsonl(full)]  # each once, in order
    assert [x["answer"] for x in rows] == [x["answer"] for x in read_jsonl(full)]


def test_data_uri_source():
    from phi3v.errors import Phi3VError
    from phi3v.sources import resolve_image

    raw = b"\x89PNG fake"
    assert resolve_image("data:image/png;base64," + base64.b64encode(raw).decode()) == raw
    with pytest.raises(Phi3VError, match="base64"):
        resolve_image("data:image/png;base64,@@@")
    with pytest.raises(Phi3VError, match="scheme"):
        resolve_image("ftp://example/x.png")


def test_quantize_flag(tiny_checkpoint, tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 48), (200, 10, 10)).save(img)
    r = phi3v("ask", img, "-p", "Colour?", "--quantize", "int8", "--max-new-tokens", "3", "--json", model=tiny_checkpoint)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["completion_tokens"] >= 1
    r = phi3v("ask", img, "-p", "Colour?", "--quantize", "int3", model=tiny_checkpoint)
    assert r.returncode == 2 and "'int3' is not one of" in r.stderr
    r = phi3v("ask", img, "-p", "Colour?", "--kv-dtype", "float32", "--max-new-tokens", "2", model=tiny_checkpoint)
    assert r.returncode == 0, r.stderr
    r = phi3v("ask", img, "-p", "Colour?", "--kv-dtype", "int8", model=tiny_checkpoint)
    assert r.returncode == 2 and "'int8' is not one of" in r.stderr


def test_make_checkpoint_then_load(tmp_path):
    r = phi3v("make-checkpoint", tmp_path / "ck", "--seed", "3")
    assert r.returncode == 0, r.stderr
    import phi3v as api

    model = api.load(tmp_path / "ck", device="cpu")
    assert isinstance(model.chat("hi", max_new_tokens=3), str)
