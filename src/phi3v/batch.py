"""`phi3v batch`: many (images, prompt) items through one model, results as JSON lines in input order.

Items are decoded together, `batch_size` at a time, by the same engine that serves the HTTP server
(`engine.Engine`, continuous batching): a free slot is refilled as soon as an item finishes. Each result line is written and flushed once every earlier
item's line is out, so the file is always a valid prefix of the final one: an interrupted run is
continued with `resume`, which skips the items already written.
"""

from __future__ import annotations

import glob
import json
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from phi3v.api import Phi3V
from phi3v.engine import Engine, Failed
from phi3v.errors import Phi3VError
from phi3v.generate import Request
from phi3v.sources import resolve_image


@dataclass(frozen=True)
class Item:
    """One unit of work: its images (paths or URLs) and prompt; `error` if the input line was unusable."""

    images: tuple[str, ...]
    prompt: str
    error: str | None = None

    @property
    def key(self) -> str:
        return json.dumps([list(self.images), self.prompt])

    def record(self) -> dict[str, Any]:
        return {"input": self.images[0] if len(self.images) == 1 else list(self.images), "prompt": self.prompt}


def discover(source: str, prompt: str | None) -> list[Item]:
    """Items from a folder (every file, sorted), a glob pattern, or a JSONL file of
    {"image": ...} / {"images": [...]} objects with an optional "prompt" (default: `prompt`)."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() in (".jsonl", ".ndjson"):
        return list(_from_jsonl(path, prompt))
    if prompt is None:
        raise Phi3VError("give the question with --prompt (or use a JSONL input whose lines carry a prompt)")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise Phi3VError(f"no input files found at {source}; pass a folder, a glob like 'scans/*.png' or a .jsonl file")
    return [Item((str(f),), prompt) for f in files]


def _from_jsonl(path: Path, default_prompt: str | None) -> Iterator[Item]:
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            images = obj.get("images", obj.get("image"))
            images = [images] if isinstance(images, str) else images
            prompt = obj.get("prompt", default_prompt)
            if not images or not all(isinstance(i, str) for i in images) or not isinstance(prompt, str):
                raise ValueError
            yield Item(tuple(images), prompt)
        except (ValueError, AttributeError):
            yield Item((f"{path}:{n}",), default_prompt or "", f"line {n} of {path.name} is not a JSON object with "
                       '"image" (or "images") and a "prompt" (or --prompt)')  # fmt: skip


def written_keys(out: Path) -> set[str]:
    """Keys of the items already in `out`; a torn last line (from a hard kill) is cut off."""
    if not out.exists():
        return set()
    text = out.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        out.write_text(text)
    keys = set()
    for line in text.splitlines():
        try:
            rec = json.loads(line)
            images = rec["input"] if isinstance(rec["input"], list) else [rec["input"]]
            keys.add(Item(tuple(images), rec["prompt"]).key)
        except (ValueError, KeyError, TypeError):
            continue
    return keys


class OrderedWriter:
    """Writes result lines in item order, each flushed as soon as all earlier ones are out."""

    def __init__(self, f: TextIO, on_write: Callable[[dict[str, Any]], None]):
        self.f, self.on_write, self.next, self.ready = f, on_write, 0, {}

    def put(self, index: int, record: dict[str, Any]) -> None:
        self.ready[index] = record
        while self.next in self.ready:
            rec = self.ready.pop(self.next)
            self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.f.flush()
            self.on_write(rec)
            self.next += 1


def run_batch(model: Phi3V, items: list[Item], out: TextIO, *, batch_size: int = 4,
              on_write: Callable[[dict[str, Any]], None] = lambda r: None, **options: Any) -> None:  # fmt: skip
    """Answer every item through the shared engine, writing one JSON line each (answer and accounting,
    or error), in input order."""
    writer = OrderedWriter(out, on_write)
    events: queue.Queue[tuple[int, Any]] = queue.Queue()
    engine = Engine(model, max_batch=batch_size, max_queue=max(len(items), 1))
    started: dict[int, float] = {}

    def build(index: int) -> Request:
        started[index] = time.perf_counter()
        item = items[index]
        if item.error:
            raise Phi3VError(item.error)
        return model.request(item.prompt, images=[resolve_image(i) for i in item.images], **options)

    def finished(index: int, event: Any) -> None:
        if isinstance(event, Failed) or event.finish_reason is not None:
            events.put((index, event))

    try:
        for index in range(len(items)):
            engine.submit(lambda i=index: build(i), lambda e, i=index: finished(i, e))
        for _ in items:
            index, event = events.get()
            if isinstance(event, Failed):
                writer.put(index, items[index].record() | {"error": str(event.error)})
                continue
            r = event.request
            writer.put(index, items[index].record() | {
                "answer": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                "completion_tokens": len(r.tokens), "seconds": round(time.perf_counter() - started[index], 3),
            })  # fmt: skip
    finally:
        engine.stop()
