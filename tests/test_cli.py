"""The `phi3v` command as a subprocess: success paths, exit codes, one-line errors."""

import subprocess
import sys

import pytest


def phi3v(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "phi3v", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def test_demo_runs_the_three_tasks(tmp_path):
    r = phi3v("demo", "--dir", tmp_path, "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stdout
    assert r.stdout.count("answer:") == 3 and r.stdout.count("question:") == 3
    for name in ("chart.png", "cover.png", "scene_a.png", "scene_b.png"):
        assert (tmp_path / name).exists() and name in r.stdout


def test_make_checkpoint_then_load(tmp_path):
    r = phi3v("make-checkpoint", tmp_path / "ck", "--seed", "3")
    assert r.returncode == 0, r.stderr
    import phi3v as api

    model = api.load(tmp_path / "ck", device="cpu")
    assert isinstance(model.chat("hi", max_new_tokens=3), str)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["demo", "--no-such-flag"], 2, "No such option"),
        (["make-checkpoint"], 2, "Missing argument"),
        (["frobnicate"], 2, "No such command"),
        (["demo", "--max-new-tokens", "0"], 2, "max-new-tokens"),
    ],
)
def test_usage_errors(args, code, message):
    r = phi3v(*args)
    assert r.returncode == code
    assert message in r.stderr and "Traceback" not in r.stderr


def test_help_has_examples():
    for cmd in ("demo", "make-checkpoint"):
        r = phi3v(cmd, "--help")
        assert r.returncode == 0 and "Example:" in r.stdout
