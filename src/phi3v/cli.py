"""The `phi3v` command. Front end only: parse, call the API, print; a user error is one line, no traceback.

Exit codes: 0 success, 1 runtime error (a bad image, URL or prompt, a failed load), 2 usage error (bad
flags, a missing file), 130 interrupted. `--debug` shows tracebacks.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from phi3v.errors import Phi3VError

DEFAULT_MODEL = "microsoft/Phi-3.5-vision-instruct"
QUANTIZE = click.Choice(["none", "int8", "int4"])  # phi3v.linear.QUANT_MODES, importable without torch
QUANTIZE_HELP = "Weight-only quantization while loading: less memory, faster decoding."
KV_DTYPE = click.Choice(["auto", "bfloat16", "float16", "float32"])
KV_DTYPE_HELP = "Dtype of the KV cache. auto: bfloat16 for a quantized model on the CPU, else as --dtype."


@dataclass(frozen=True)
class Settings:
    """The options every model command shares."""

    model: str
    device: str
    dtype: str
    quantize: str
    kv_dtype: str
    num_crops: int | None
    max_new_tokens: int
    temperature: float
    seed: int | None
    as_json: bool
    quiet: bool
    ignore_eos: bool

    def generation(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "seed": self.seed,
                "num_crops": self.num_crops, "ignore_eos": self.ignore_eos}  # fmt: skip

    def say(self, message: str) -> None:
        """Status text for people, on stderr, so stdout carries only answers."""
        if not self.quiet:
            click.echo(message, err=True)


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add the shared options; the command receives them as one `settings` argument."""
    options = [
        click.option("--model", "-m", envvar="PHI3V_MODEL", default=DEFAULT_MODEL, show_default=True,
                     help="Checkpoint folder or Hugging Face id in the local cache (env PHI3V_MODEL)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
                     show_default=True, help="auto: bfloat16 on GPUs and bf16-capable CPUs, else float32."),
        click.option("--quantize", type=QUANTIZE, default="none", show_default=True, help=QUANTIZE_HELP),
        click.option("--kv-dtype", type=KV_DTYPE, default="auto", show_default=True, help=KV_DTYPE_HELP),
        click.option("--num-crops", type=click.IntRange(1, 64),
                     help="Image tiles (16: one detailed image, 4: several); default from the checkpoint."),
        click.option("--max-new-tokens", type=click.IntRange(1, 131072), default=512, show_default=True),
        click.option("--temperature", type=click.FloatRange(0, 100), default=0.0, show_default=True,
                     help="0 is greedy decoding, as in the model cards."),
        click.option("--seed", type=int, help="Seed for sampling (with --temperature > 0)."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object: answer, token counts, timings."),
        click.option("--quiet", "-q", is_flag=True, help="No progress or status output, only the answer."),
        click.option("--ignore-eos", is_flag=True, hidden=True, help="Never stop on end tokens (benchmarks)."),
    ]  # fmt: skip

    def wrapper(**kw: Any) -> Any:
        names = Settings.__dataclass_fields__
        settings = Settings(**{k: kw.pop(k) for k in list(kw) if k in names})
        return f(settings=settings, **kw)

    wrapper.__name__, wrapper.__doc__ = f.__name__, f.__doc__
    for opt in reversed(options):
        wrapper = opt(wrapper)
    return wrapper


def load_with_progress(s: Settings) -> Any:
    """Load with a progress bar (unless --quiet)."""
    import phi3v
    from tqdm import tqdm

    s.say(f"loading {s.model} ...")
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="tensor", desc="loading", disable=s.quiet, leave=False, file=sys.stderr)
        bar.update(done - bar.n)

    t0 = time.perf_counter()
    try:
        model = phi3v.load(s.model, device=s.device, dtype=s.dtype, num_crops=s.num_crops, progress=progress,
                            quantize=s.quantize, kv_dtype=s.kv_dtype)
    finally:
        if bar is not None:
            bar.close()
    p = next(model.model.parameters())
    s.say(f"loaded in {time.perf_counter() - t0:.1f} s ({p.dtype}, {p.device})")
    return model


def read_images(sources: tuple[str, ...]) -> list[Any]:
    """Fetch and decode every image before the model loads, so a bad one fails fast."""
    from phi3v.image_processor import load_image
    from phi3v.sources import resolve_image

    if sum(src == "-" for src in sources) > 1:
        raise click.UsageError("standard input ('-') can be given as one image only")
    images = []
    for src in sources:
        local = src != "-" and "://" not in src and not src.startswith("data:")
        if local and not Path(src).expanduser().exists():
            raise click.BadParameter(f"{src}: no such file", param_hint="IMAGE")
        images.append(load_image(resolve_image(src)))
    return images


def answer(s: Settings, model: Any, messages: Any, images: list[Any] | None = None, stream: bool = True) -> Any:
    """Generate, streaming text to stdout unless --json; returns the Completion."""
    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    done = model.run(messages, images or (), on_text=write if stream and not s.as_json else None, **s.generation())
    if stream and not s.as_json:
        write("\n")
    return done


def report(s: Settings, done: Any, answer_value: Any = None, **extra: Any) -> None:
    """--json output: the answer with token counts and timings."""
    if not s.as_json:
        return
    rate = done.completion_tokens / max(done.seconds - done.first_token_seconds, 1e-9)
    click.echo(json.dumps({
        "answer": done.text if answer_value is None else answer_value, "model": s.model,
        "finish_reason": done.finish_reason, "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens, "seconds": round(done.seconds, 3),
        "time_to_first_token": round(done.first_token_seconds, 3), "decode_tokens_per_second": round(rate, 2),
        **extra,
    }, ensure_ascii=False))  # fmt: skip


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="phi3v")
def cli(debug: bool) -> None:
    """Run Phi-3-Vision and Phi-3.5-Vision locally: describe images, read text, compare pictures.

    IMAGE arguments are file paths, http(s) URLs, or - for standard input.
    """


def ask_images(s: Settings, images: tuple[str, ...], prompt: str) -> None:
    imgs = read_images(images)
    model = load_with_progress(s)
    done = answer(s, model, prompt, imgs)
    report(s, done, images=list(images))


@cli.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--prompt", "-p", required=True, help="The question to ask about the images.")
@model_options
def ask(settings: Settings, images: tuple[str, ...], prompt: str) -> None:
    """Ask any question about one or more images.

    Example: phi3v ask receipt.jpg -p "What is the total?"
    """
    ask_images(settings, images, prompt)


@cli.command()
@click.argument("image")
@model_options
def describe(settings: Settings, image: str) -> None:
    """Describe or analyse an image: photos, charts, diagrams, screenshots.

    Example: phi3v describe chart.png
    """
    from phi3v.presets import DESCRIBE

    ask_images(settings, (image,), DESCRIBE)


@cli.command()
@click.argument("image")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "json"]), default="text", show_default=True)
@model_options
def ocr(settings: Settings, image: str, fmt: str) -> None:
    """Transcribe the text of an image verbatim, in reading order, without commentary.

    With --format json the answer is checked to be a JSON object (one retry if it is not).

    Example: phi3v ocr scan.png --format markdown
    """
    from phi3v.presets import OCR, OCR_JSON_RETRY, parse_json_object

    if fmt != "json":
        return ask_images(settings, (image,), OCR[fmt])
    imgs = read_images((image,))
    model = load_with_progress(settings)
    turn = [{"type": "image", "image": imgs[0]}, {"type": "text", "text": OCR["json"]}]
    messages: list[dict[str, Any]] = [{"role": "user", "content": turn}]
    done = answer(settings, model, messages, stream=False)
    obj = parse_json_object(done.text)
    if obj is None:
        settings.say("the answer was not valid JSON; asking once more")
        messages += [{"role": "assistant", "content": done.text}, {"role": "user", "content": OCR_JSON_RETRY}]
        done = answer(settings, model, messages, stream=False)
        obj = parse_json_object(done.text)
    if obj is None:
        raise Phi3VError("the model did not produce a valid JSON object twice; try --format text or markdown")
    if settings.as_json:
        report(settings, done, obj, images=[image])
    else:
        click.echo(json.dumps(obj, ensure_ascii=False, indent=2))


@cli.command()
@click.argument("images", nargs=-1, required=True)
@model_options
def compare(settings: Settings, images: tuple[str, ...]) -> None:
    """Say what differs between two or more images.

    Example: phi3v compare before.png after.png
    """
    from phi3v.presets import COMPARE

    if len(images) < 2:
        raise click.UsageError("compare needs at least two images")
    ask_images(settings, images, COMPARE)


@cli.command()
@click.option("--image", "-i", "images", multiple=True, help="Attach an image to the first message (repeatable).")
@model_options
def chat(settings: Settings, images: tuple[str, ...]) -> None:
    """Talk about images over several turns. In the session: /image PATH attaches an image to your next
    message, /reset starts over, /quit (or Ctrl-D) leaves.

    Example: phi3v chat --image photo.jpg
    """
    from phi3v.chat import run_chat

    attached = read_images(images)
    run_chat(load_with_progress(settings), settings, attached, read_images)


@cli.command()
@click.argument("source")
@click.option("--prompt", "-p", help="The question for every image (JSONL lines may carry their own).")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Results file, one JSON line per item, in input order.")
@click.option("--batch-size", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Items decoded together.")
@click.option("--resume", is_flag=True, help="Skip the items already in --out and append the rest.")
@model_options
def batch(settings: Settings, source: str, prompt: str | None, out: Path, batch_size: int, resume: bool) -> None:
    """Run one prompt over many images: a folder, a glob, or a JSONL file of {"image" or "images", "prompt"}.

    An unreadable image becomes an error line and the run goes on; Ctrl-C leaves a valid file that --resume
    continues.

    Example: phi3v batch scans/ -p "Transcribe the text." -o results.jsonl
    """
    from tqdm import tqdm

    from phi3v.batch import discover, run_batch, written_keys

    items = discover(source, prompt)
    if out.exists() and not resume and out.stat().st_size:
        raise click.UsageError(f"{out} already exists; pass --resume to continue it or choose another --out")
    done = written_keys(out) if resume else set()
    todo = [it for it in items if it.key not in done]
    settings.say(f"{len(items)} items, {len(items) - len(todo)} already done, {len(todo)} to run")
    if not todo:
        return
    model = load_with_progress(settings)
    errors = 0
    with open(out, "a", encoding="utf-8") as f, tqdm(total=len(todo), unit="item", disable=settings.quiet,
                                                     file=sys.stderr, desc="batch") as bar:  # fmt: skip
        def on_write(rec: dict[str, Any]) -> None:
            nonlocal errors
            errors += "error" in rec
            bar.update(1)

        try:
            run_batch(model, todo, f, batch_size=batch_size, on_write=on_write, **settings.generation())
        except KeyboardInterrupt:
            bar.close()
            click.echo(f"interrupted: {bar.n} of {len(todo)} items written to {out}; rerun with --resume", err=True)
            sys.exit(130)
    settings.say(f"wrote {len(todo)} results to {out} ({errors} errors)")


@cli.command()
@click.option("--model", "-m", envvar="PHI3V_MODEL", default=DEFAULT_MODEL, show_default=True,
              help="Checkpoint folder or Hugging Face id in the local cache (env PHI3V_MODEL).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="PHI3V_API_KEY", help="Require 'Authorization: Bearer KEY' (env PHI3V_API_KEY).")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto")
@click.option("--quantize", type=QUANTIZE, default="none", show_default=True, help=QUANTIZE_HELP)
@click.option("--kv-dtype", type=KV_DTYPE, default="auto", show_default=True, help=KV_DTYPE_HELP)
@click.option("--num-crops", type=click.IntRange(1, 64), help="Default image tiles (requests may set num_crops).")
@click.option("--allow-remote-images", is_flag=True, help="Fetch http(s) image URLs (off by default).")
@click.option("--allowed-local-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Serve file:// images from inside this folder only (off by default).")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(1, 256), help="Requests decoded together.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(0, 100000),
              help="Waiting requests beyond the batch; more get 429.")
@click.option("--max-image-bytes", default=20 * 1024 * 1024, show_default=True, type=click.IntRange(1))
@click.option("--max-pixels", default=40_000_000, show_default=True, type=click.IntRange(1))
@click.option("--max-images", default=8, show_default=True, type=click.IntRange(0), help="Images per request.")
@click.option("--max-prompt-tokens", type=click.IntRange(1), help="Longest prompt accepted (default: the context).")
@click.option("--max-new-tokens", default=4096, show_default=True, type=click.IntRange(1),
              help="Largest max_tokens a request may ask for.")
def serve(model: str, host: str, port: int, api_key: str | None, device: str, dtype: str, quantize: str,
          kv_dtype: str, num_crops: int | None, **limits: Any) -> None:  # fmt: skip
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health) with continuous batching.

    Example: phi3v serve --model microsoft/Phi-3.5-vision-instruct --port 8000
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise Phi3VError("the server needs FastAPI and uvicorn: pip install 'phi3v[server]'") from None
    import phi3v
    from phi3v.server import ServerConfig, create_app

    name = Path(model).name if Path(model).expanduser().is_dir() else model
    cfg = ServerConfig(model_name=name, api_key=api_key, **limits)
    app = create_app(cfg, lambda: phi3v.load(model, device=device, dtype=dtype, num_crops=num_crops, quantize=quantize,
                                             kv_dtype=kv_dtype))
    click.echo(f"phi3v serving {model} on http://{host}:{port}/v1 (loading in the background; see /health)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@cli.command("make-checkpoint")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--full", is_flag=True, help="Real dimensions (4.1B parameters, 8.3 GB in bf16) instead of tiny.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option("--tokenizer-from", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder with a Phi-3-Vision tokenizer.json to copy; default: a generated byte-level one.")
@click.option("--num-crops", type=click.IntRange(1, 64), help="num_crops in preprocessor_config.json.")
def make_checkpoint(folder: Path, full: bool, seed: int, tokenizer_from: Path | None, num_crops: int | None) -> None:
    """Write a random-weight checkpoint in the official layout (for tests and benchmarks).

    Example: phi3v make-checkpoint ./tiny-phi3v
    """
    from phi3v.checkpoint import write_checkpoint

    t0 = time.perf_counter()
    write_checkpoint(folder, "full" if full else "tiny", seed=seed, tokenizer_dir=tokenizer_from, num_crops=num_crops)
    click.echo(f"wrote a random {'full-size' if full else 'tiny'} checkpoint to {folder} in {time.perf_counter() - t0:.1f} s")


@cli.command()
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path),
              help="Where to save the generated images (default: a temporary folder).")
@click.option("--seed", type=int, help="Draw the same images again (default: new ones every run).")
@click.option("--model", "-m", default="pocket", show_default=True, help="Checkpoint to ask.")
def demo(folder: Path | None, seed: int | None, model: str) -> None:
    """Analyse a chart, read a text image, compare two images: the official tutorial's three tasks, answered
    by the pocket model (a small Phi-3-V trained by phi3v, shipped in the package) on freshly drawn images.

    Example: phi3v demo
    """
    from phi3v.demo import accuracy_line, run

    folder = folder or Path(tempfile.mkdtemp(prefix="phi3v-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    seed = seed if seed is not None else random.randrange(1_000_000)
    right = run(folder, seed, model, say=click.echo)
    click.echo(f"\n{right}/3 right." + (f" {accuracy_line()}" if model == "pocket" else ""))
    click.echo("Real checkpoints work the same way: phi3v.load('microsoft/Phi-3.5-vision-instruct')")


def main() -> None:
    """Entry point: usage errors exit 2, phi3v's own errors print one line and exit 1."""
    debug = "--debug" in sys.argv[1:]
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except Phi3VError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:  # `phi3v ... | head`
        os._exit(0)
