"""OpenAI-compatible HTTP server: /v1/chat/completions (plain and SSE streaming), /v1/models, /health.

Front end only: requests are validated here (OpenAI's error shape and statuses: 400 malformed, 401 key,
413 too large, 422 bad values, 429 queue full, 503 loading) and answered by the shared `Engine`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from phi3v.engine import Engine, Failed, QueueFull
from phi3v.errors import Phi3VError, TooLarge


@dataclass(frozen=True)
class ServerConfig:
    """Limits and safety switches (all flags of `phi3v serve`)."""

    model_name: str = "phi3v"
    api_key: str | None = None
    allow_remote_images: bool = False
    allowed_local_dir: Path | None = None
    max_image_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images: int = 8
    max_prompt_tokens: int | None = None  # default: the model's context
    max_new_tokens: int = 4096
    max_body_bytes: int = 64 * 1024 * 1024
    max_batch: int = 16
    max_queue: int = 64


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class State:
    """What the app holds: the engine once the model is loaded, or the load error."""

    engine: Any = None
    error: str | None = None
    started: float = field(default_factory=time.time)


def _number(body: dict[str, Any], name: str, lo: float, hi: float, default: Any, integer: bool = False) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise APIError(422, f"{name} must be {kind} between {lo} and {hi}, got {value!r}", param=name)
    return value


def parse_options(body: dict[str, Any], cfg: ServerConfig) -> dict[str, Any]:
    """Generation options from an OpenAI request body; 422 for out-of-range values."""
    if body.get("n", 1) != 1:
        raise APIError(422, "only n=1 is supported", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({name: max_tokens}, name, 1, cfg.max_new_tokens, min(512, cfg.max_new_tokens), True)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop)):
        raise APIError(422, "stop must be a string or a list of up to 4 strings", param="stop")
    num_crops = _number(body, "num_crops", 1, 64, None, True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(422, "seed must be an integer", param="seed")
    return {
        "max_new_tokens": max_tokens, "temperature": _number(body, "temperature", 0, 2, 0.0),
        "top_p": _number(body, "top_p", 1e-9, 1, 1.0), "seed": seed, "stop": stop, "num_crops": num_crops,
        "ignore_eos": body.get("ignore_eos") is True,  # an extension (as in vLLM), for benchmarks
    }  # fmt: skip


def parse_messages(body: dict[str, Any], cfg: ServerConfig) -> list[dict[str, Any]]:
    """Messages with every image fetched, decoded and size-checked (400 / 413 on a bad one)."""
    from phi3v.image_processor import load_image
    from phi3v.prompt import chat_prompt
    from phi3v.sources import resolve_image

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    try:
        _, refs = chat_prompt(messages)  # validates roles and parts, numbers images in order
    except Phi3VError as e:
        raise APIError(400, str(e), param="messages") from None
    if len(refs) > cfg.max_images:
        raise APIError(400, f"{len(refs)} images in one request; the limit is {cfg.max_images}", param="messages")
    decoded = iter([_image(r, cfg, resolve_image, load_image) for r in refs])
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [{"type": "image", "image": next(decoded)} if p.get("type") in ("image", "image_url") else p
                       for p in content]  # fmt: skip
        out.append({"role": m["role"], "content": content})
    return out


def _image(ref: Any, cfg: ServerConfig, resolve_image: Any, load_image: Any) -> Any:
    if not isinstance(ref, str):
        raise APIError(400, "image_url.url must be a string", param="messages")
    if ref.startswith(("http://", "https://")) and not cfg.allow_remote_images:
        raise APIError(400, "remote image URLs are disabled on this server (start it with --allow-remote-images)")
    is_file = ref.startswith("file://")
    if not (is_file or ref.startswith(("data:", "http://", "https://"))):
        raise APIError(400, "image_url.url must be a data: URI, an http(s):// URL or a file:// URL", param="messages")
    if is_file and cfg.allowed_local_dir is None:
        raise APIError(400, "file:// images are disabled on this server (start it with --allowed-local-dir DIR)")
    try:
        src = resolve_image(ref, allow_remote=cfg.allow_remote_images, allowed_dir=cfg.allowed_local_dir,
                            allow_local=is_file, max_bytes=cfg.max_image_bytes)  # fmt: skip
        if isinstance(src, (bytes, bytearray)) and len(src) > cfg.max_image_bytes:
            raise APIError(413, f"an image is over the {cfg.max_image_bytes}-byte limit", code="image_too_large")
        return load_image(src, max_pixels=cfg.max_pixels)
    except Phi3VError as e:
        raise APIError(413 if isinstance(e, TooLarge) else 400, str(e), param="messages") from None


def completion_body(rid: str, model: str, created: int, text: str, finish: str, usage: dict[str, int]) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage}  # fmt: skip


def chunk(rid: str, model: str, created: int, delta: dict[str, Any], finish: str | None) -> str:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def usage_of(req: Any) -> dict[str, int]:
    n_in, n_out = req.prompt_tokens, len(req.tokens)
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def create_app(cfg: ServerConfig, load: Any) -> FastAPI:
    """The FastAPI app. `load()` returns a `Phi3V`; it runs in a background thread, /health says when ready."""
    state = State()

    def start() -> None:
        try:
            state.engine = Engine(load(), max_batch=cfg.max_batch, max_queue=cfg.max_queue)
        except Exception as e:  # noqa: BLE001 - reported by /health and every request
            state.error = str(e)

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        threading.Thread(target=start, name="phi3v-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="phi3v", version="0.1.0", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {cfg.api_key}":
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", "authentication_error",
                           code="invalid_api_key")  # fmt: skip

    def engine() -> Engine:
        if state.error is not None:
            raise APIError(503, f"the model failed to load: {state.error}", "server_error")
        if state.engine is None:
            raise APIError(503, "the model is still loading; retry shortly", "server_error", code="loading")
        return state.engine

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine is not None:
            return JSONResponse({"status": "ready", "model": cfg.model_name, **state.engine.load})
        status = "error" if state.error else "loading"
        return JSONResponse({"status": status, "error": state.error}, status_code=503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": int(state.started),
                                            "owned_by": "phi3v"}]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        check_key(request)
        eng = engine()
        raw = await request.body()
        if len(raw) > cfg.max_body_bytes:
            raise APIError(413, f"request body over {cfg.max_body_bytes} bytes", code="body_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        options = parse_options(body, cfg)
        messages = await asyncio.to_thread(parse_messages, body, cfg)
        stream = bool(body.get("stream", False))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        limit = cfg.max_prompt_tokens

        def build() -> Any:
            req = eng.model.request(messages, **options)
            if limit is not None and req.prompt_tokens > limit:
                raise Phi3VError(f"the prompt is {req.prompt_tokens} tokens; this server allows {limit}")
            return req

        try:
            handle = eng.submit(build, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        except QueueFull:
            raise APIError(429, "the server is busy (queue full); retry later", "rate_limit_error") from None
        first = await events.get()
        if isinstance(first, Failed):
            raise _failed(first)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if stream:
            gen = _sse(first, events, handle, rid, cfg.model_name, created, include_usage)
            return StreamingResponse(gen, media_type="text/event-stream")
        watcher = asyncio.create_task(_watch_disconnect(request, handle))
        try:
            event = first
            while event.finish_reason is None:
                event = await events.get()
                if isinstance(event, Failed):
                    raise _failed(event)
        finally:
            watcher.cancel()
        req = event.request
        return completion_body(rid, cfg.model_name, created, req.text, req.finish_reason, usage_of(req))

    return app


def _failed(f: Failed) -> APIError:
    if isinstance(f.error, Phi3VError):
        msg = str(f.error)
        code = "context_length_exceeded" if "context" in msg or "allows" in msg else None
        return APIError(400, msg, code=code)
    return APIError(500, f"internal error: {f.error}", "server_error")


async def _watch_disconnect(request: Any, handle: Any) -> None:
    while True:
        await asyncio.sleep(0.5)
        if await request.is_disconnected():
            handle.cancel()
            return


async def _sse(first: Any, events: asyncio.Queue, handle: Any, rid: str, model: str, created: int,
               include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
    """SSE chunks: the role, one chunk per text delta, the finish reason, usage if asked, then [DONE]."""
    try:
        yield chunk(rid, model, created, {"role": "assistant", "content": ""}, None)
        event = first
        while True:
            if isinstance(event, Failed):
                yield f"data: {json.dumps(_failed(event).body())}\n\n"
                break
            if event.text:
                yield chunk(rid, model, created, {"content": event.text}, None)
            if event.finish_reason is not None:
                yield chunk(rid, model, created, {}, event.finish_reason)
                if include_usage:
                    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": usage_of(event.request)}  # fmt: skip
                    yield f"data: {json.dumps(body)}\n\n"
                break
            event = await events.get()
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()  # a client that went away frees its row at the next step
