"""Small OpenAI-compatible servers for tests and offline smoke runs of the ``openai`` backend.

Two servers, both bound to the loopback interface only:

``thyme dev serve MODEL [--port 0] [--port-file F] [--served-model-name NAME]``
    Our test server: FastAPI + uvicorn (they come with ``transformers[serving]``) over the
    ``hf`` backend. It implements exactly the vLLM request fields :mod:`thyme.backends.openai`
    sends, with vLLM's semantics:

    - ``POST /v1/chat/completions``: ``model``, ``messages`` (``content`` a string or a list of
      ``text`` / ``image_url`` parts; images as ``data:`` URLs only), ``max_tokens`` /
      ``max_completion_tokens``, ``temperature`` (absent: 1.0), ``top_p``, ``top_k`` (0 / -1: off),
      ``repetition_penalty``, ``seed``, ``stop`` (string or list), ``include_stop_str_in_output``
      (default false: the matched stop string is removed from the text and returned as
      ``stop_reason``), ``skip_special_tokens`` (true only), ``continue_final_message`` /
      ``add_generation_prompt`` (the prompt is rendered as vLLM renders it: the processor's
      ``apply_chat_template(messages, add_generation_prompt=..., continue_final_message=...)``;
      both true is refused with vLLM's message), ``n`` (1 only), ``stream`` (true: the same
      answer as server-sent events, :func:`sse_chunks`; ``stream_options.include_usage`` adds
      the ``usage`` chunk).
      Any other field is refused with HTTP 400 naming it, so a test proves what the client sends.
      Response: ``choices[0].message.content``, ``finish_reason`` (``stop`` for a stop string and
      for end of turn, ``length``), ``stop_reason`` (the stop string, else null), ``usage``.
    - ``POST /v1/completions``: a raw text ``prompt`` (no images), same sampling fields.
    - ``GET /v1/models``, ``GET /health``.
    - Test controls (no authentication: loopback only): ``POST /debug/fail`` with a list of
      ``{"status": 429, "body": "...", "retry_after": 0, "delay_s": 0}`` entries, applied in order
      to the next generation requests (``status`` null / absent: answer normally after
      ``delay_s``); ``GET /debug/requests`` (every request received: its body with images
      replaced by ``{"image": {"mime", "bytes", "size": [w, h]}}``, the rendered ``prompt``, the
      ``status`` answered); ``GET /debug/stats`` (``max_in_flight``); ``POST /debug/reset``.

    Concurrent requests are batched (up to ``--max-batch`` arriving within ``--batch-wait-ms``)
    into one ``HFBackend.generate`` call, as vLLM batches; a failing batch is retried request
    by request so one bad request never fails the others.

``thyme dev transformers-serve MODEL --port N``
    ``transformers serve MODEL`` on 127.0.0.1 (a real third-party server). Without torchvision
    its processor loading fails for Qwen VL checkpoints (the video processor needs torchvision);
    this launcher then makes it load the processor with :func:`thyme.backends.processors.load_processor`
    (same classes, no video half) and changes nothing else.

:func:`start_server` starts either as a subprocess and waits (bounded) until it answers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # module level: FastAPI resolves the handlers' (string) annotations in this module's globals
    from starlette.requests import Request
except ImportError:  # pragma: no cover - the serve command then explains what to install
    Request = None  # type: ignore[assignment,misc]

LOOPBACK = ("127.0.0.1", "::1", "localhost")

CHAT_FIELDS = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "stop",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "continue_final_message",
    "add_generation_prompt",
    "n",
    "stream",
    "stream_options",
}
COMPLETION_FIELDS = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "stop",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "n",
    "stream",
    "stream_options",
}
DEFAULT_MAX_TOKENS = 512


class BadRequest(Exception):
    """A request the server refuses with HTTP 400 (or ``status``)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- request parsing


def decode_data_url(url: str) -> tuple[Any, dict[str, Any]]:
    """``data:image/...;base64,...`` -> (RGB PIL image, ``{"mime", "bytes", "size"}``).

    Raises:
        BadRequest: not a base64 data URL of a readable image (remote URLs are refused: the
            server has no network).
    """
    from ..imageio import open_image_bytes

    if not isinstance(url, str) or not url.startswith("data:"):
        raise BadRequest(f"only data: image URLs are supported by this server, got {str(url)[:60]!r}")
    head, _, b64 = url.partition(",")
    if ";base64" not in head:
        raise BadRequest("image data URLs must be base64-encoded")
    try:
        raw = base64.b64decode(b64, validate=True)
        im = open_image_bytes(raw, name="image data URL")  # budgets checked from the header
    except Exception as e:
        raise BadRequest(f"cannot decode image data URL: {type(e).__name__}: {e}") from None
    info = {"mime": head[5:].split(";")[0], "bytes": len(raw), "size": list(im.size), "format": im.format}
    return im.convert("RGB"), info


def _content_parts(content: Any, where: str) -> tuple[list[dict[str, Any]], Any]:
    """Message content -> (hf-style parts with PIL images, sanitised copy for the log)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}], content
    if not isinstance(content, list):
        raise BadRequest(f"{where}: content must be a string or a list of parts")
    parts, logged = [], []
    for p in content:
        if not isinstance(p, dict):
            raise BadRequest(f"{where}: content parts must be objects")
        kind = p.get("type")
        if kind == "text":
            if not isinstance(p.get("text"), str):
                raise BadRequest(f"{where}: text part without a string 'text'")
            parts.append({"type": "text", "text": p["text"]})
            logged.append({"type": "text", "text": p["text"]})
        elif kind == "image_url":
            iu = p.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            im, info = decode_data_url(url)
            parts.append({"type": "image", "image": im})
            logged.append({"type": "image_url", "image": info})
        else:
            raise BadRequest(f"{where}: unsupported content part type {kind!r}")
    return parts, logged


@dataclass
class ParsedRequest:
    """A validated request, ready for the backend."""

    messages: list[dict[str, Any]]
    assistant_parts: list[dict[str, Any]]
    add_generation_prompt: bool
    raw_prompt: str | None
    max_tokens: int
    stop: list[str]
    include_stop: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int | None
    logged: dict[str, Any] = field(default_factory=dict)


def sse_chunks(out: dict[str, Any], *, piece_chars: int = 4, include_usage: bool = True) -> list[bytes]:
    """A non-streamed completion ``out`` (chat or text) as the server-sent events vLLM sends for
    ``"stream": true``: a role chunk (chat), the text in pieces of ``piece_chars`` characters,
    a last chunk with ``finish_reason`` / ``stop_reason``, a ``usage`` chunk with no choices
    (``include_usage``), ``[DONE]``. Each item is one ``data: ...\n\n`` event."""
    chat = out.get("object") == "chat.completion"
    ch = out["choices"][0]
    text = (ch.get("message") or {}).get("content") if chat else ch.get("text")
    text = text or ""
    base = {
        "id": out.get("id"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": out.get("created"),
        "model": out.get("model"),
    }

    def choice(piece: str, finish: Any = None, stop: Any = None) -> dict[str, Any]:
        c: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish, "stop_reason": stop}
        if chat:
            c["delta"] = {"content": piece}
        else:
            c["text"] = piece
        return c

    events: list[dict[str, Any]] = []
    if chat:
        events.append(
            {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
        )
    n = max(1, int(piece_chars))
    events += [{**base, "choices": [choice(text[i : i + n])]} for i in range(0, len(text), n)]
    events.append({**base, "choices": [choice("", ch.get("finish_reason"), ch.get("stop_reason"))]})
    if include_usage and out.get("usage") is not None:
        events.append({**base, "choices": [], "usage": out["usage"]})
    return [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]


def _common(body: dict[str, Any], allowed: set[str], served: str) -> dict[str, Any]:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unsupported request fields: {unknown}")
    if body.get("model") not in (None, served):
        raise BadRequest(f"The model `{body.get('model')}` does not exist.", status=404)
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported")
    opts = body.get("stream_options")
    if opts is not None and (not body.get("stream") or not isinstance(opts, dict) or set(opts) - {"include_usage"}):
        raise BadRequest("stream_options is only allowed with stream=true, and only include_usage")
    if body.get("skip_special_tokens", True) is not True:
        raise BadRequest("skip_special_tokens=false is not supported by this test server")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("stop must be a string or a list of strings")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise BadRequest("max_tokens must be a positive integer")
    temp = body.get("temperature")
    temp = 1.0 if temp is None else temp
    top_k = body.get("top_k")
    top_k = 0 if top_k in (None, -1) else top_k
    seed = body.get("seed")
    for name, v in (("temperature", temp), ("top_p", body.get("top_p", 1.0)), ("repetition_penalty", body.get("repetition_penalty", 1.0))):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise BadRequest(f"{name} must be a number")
    if not isinstance(top_k, int) or top_k < 0:
        raise BadRequest("top_k must be -1, 0 or a positive integer")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise BadRequest("seed must be an integer")
    return {
        "max_tokens": max_tokens,
        "stop": stop,
        "include_stop": bool(body.get("include_stop_str_in_output", False)),
        "temperature": float(temp),
        "top_p": float(body.get("top_p") if body.get("top_p") is not None else 1.0),
        "top_k": int(top_k),
        "repetition_penalty": float(body.get("repetition_penalty") if body.get("repetition_penalty") is not None else 1.0),
        "seed": seed,
    }


def parse_chat(body: Any, served: str) -> ParsedRequest:
    """Validate a chat-completions body as vLLM would (see the module docstring).

    Raises:
        BadRequest: naming the problem.
    """
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    common = _common(body, CHAT_FIELDS, served)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("messages must be a non-empty list")
    cfm = bool(body.get("continue_final_message", False))
    agp = bool(body.get("add_generation_prompt", True))
    if cfm and agp:
        raise BadRequest("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
    converted, logged = [], []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(f"messages[{k}] must be an object with role system, user or assistant")
        parts, lg = _content_parts(m.get("content"), f"messages[{k}]")
        converted.append({"role": m["role"], "content": parts})
        logged.append({"role": m["role"], "content": lg})
    assistant: list[dict[str, Any]] = []
    if cfm:
        if converted[-1]["role"] != "assistant":
            raise BadRequest("continue_final_message needs a final assistant message")
        assistant = converted.pop()["content"]
        if not assistant or assistant[-1]["type"] != "text":
            raise BadRequest("continue_final_message is set but we could not find any text to continue in the final message!")
    elif not agp:
        raise BadRequest("add_generation_prompt=false without continue_final_message is not supported by this test server")
    sanitized = {k: v for k, v in body.items() if k != "messages"}
    sanitized["messages"] = logged
    return ParsedRequest(converted, assistant, agp, None, logged=sanitized, **common)


def parse_completion(body: Any, served: str) -> ParsedRequest:
    """Validate a completions body (text prompt only).

    Raises:
        BadRequest: naming the problem.
    """
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    common = _common(body, COMPLETION_FIELDS, served)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    return ParsedRequest([], [], True, prompt, logged=dict(body), **common)


# --------------------------------------------------------------------------- generation


def _vllm_style_backend(model: str, seed: int | None = None):
    """An ``HFBackend`` whose prompts are rendered as vLLM renders chat requests."""
    from ..backends.hf import HFBackend
    from ..backends.hf import Prepared as _Prepared

    class VLLMStyleBackend(HFBackend):
        def render_prompt(self, request):  # noqa: D401 - see module docstring
            raw = getattr(request.key, "raw_prompt", None)
            if raw is not None:
                return raw
            msgs = list(request.messages)
            if request.assistant_parts:
                msgs.append({"role": "assistant", "content": list(request.assistant_parts)})
                out = self.processor.apply_chat_template(msgs, continue_final_message=True, add_generation_prompt=False, tokenize=False)
            else:
                out = self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            return out[0] if isinstance(out, list) else out

        def prepare(self, request):
            if getattr(request.key, "raw_prompt", None) is not None:
                return _Prepared(request.key.raw_prompt, [])
            return super().prepare(request)

    return VLLMStyleBackend(model, seed=seed)


@dataclass
class _Key:
    raw_prompt: str | None
    id: str


@dataclass
class _Job:
    request: Any
    parsed: ParsedRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class Generator:
    """A worker thread batching requests into ``backend.generate`` calls."""

    def __init__(self, backend: Any, max_batch: int = 8, batch_wait_s: float = 0.01):
        self.backend = backend
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="thyme-dev-generator", daemon=True)
        self.thread.start()

    def submit(self, parsed: ParsedRequest) -> asyncio.Future:
        from ..backends.base import GenerationRequest

        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        req = GenerationRequest(
            messages=parsed.messages,
            assistant_parts=parsed.assistant_parts,
            max_new_tokens=parsed.max_tokens,
            stop=list(parsed.stop),
            temperature=parsed.temperature,
            top_p=parsed.top_p,
            top_k=parsed.top_k,
            repetition_penalty=parsed.repetition_penalty,
            seed=parsed.seed,
            key=_Key(parsed.raw_prompt, uuid.uuid4().hex),
            round=0,
        )
        parsed.logged["prompt"] = None
        self.jobs.put(_Job(req, parsed, loop, fut))
        return fut

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            batch = [job]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    nxt = self.jobs.get(timeout=left)
                except queue.Empty:
                    break
                if nxt is None:
                    self.jobs.put(None)
                    break
                batch.append(nxt)
            self._generate(batch)

    def _generate(self, batch: list[_Job]) -> None:
        try:
            for j in batch:
                j.parsed.logged["prompt"] = self.backend.render_prompt(j.request)
            gens = self.backend.generate([j.request for j in batch])
            outcomes: list[Any] = list(gens)
        except Exception:
            outcomes = []
            for j in batch:  # isolate the failing request(s)
                try:
                    outcomes.append(self.backend.generate([j.request])[0])
                except Exception as e:
                    outcomes.append(e)
        for j, out in zip(batch, outcomes):
            setter = j.future.set_exception if isinstance(out, Exception) else j.future.set_result
            j.loop.call_soon_threadsafe(_resolve, j.future, setter, out)

    def stop(self) -> None:
        self.jobs.put(None)


def _resolve(fut: asyncio.Future, setter, value) -> None:
    if not fut.done():
        setter(value)


def response_choice(gen: Any, parsed: ParsedRequest) -> dict[str, Any]:
    """vLLM's choice fields for a :class:`~thyme.backends.base.Generation`."""
    text = gen.text
    stop_reason = None
    if gen.finish_reason == "stop" and gen.stop is not None:
        stop_reason = gen.stop
        if not parsed.include_stop and text.endswith(gen.stop):
            text = text[: -len(gen.stop)]
    finish = "length" if gen.finish_reason == "length" else "stop"
    return {"text": text, "finish_reason": finish, "stop_reason": stop_reason}


# --------------------------------------------------------------------------- the app


def build_app(backend: Any, served_model_name: str, *, max_batch: int = 8, batch_wait_s: float = 0.01, log_limit: int = 1000):
    """The FastAPI application (see the module docstring)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI(title="thyme dev OpenAI-compatible server")
    gen = Generator(backend, max_batch=max_batch, batch_wait_s=batch_wait_s)
    state: dict[str, Any] = {"plan": deque(), "log": deque(maxlen=log_limit), "in_flight": 0, "max_in_flight": 0}
    app.state.generator = gen

    def error(status: int, message: str) -> JSONResponse:
        kind = {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError"}.get(
            status, "ServerError" if status >= 500 else "Error"
        )
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status_code=status)

    async def handle(request: Request, endpoint: str) -> JSONResponse:
        state["in_flight"] += 1
        state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        entry: dict[str, Any] = {"endpoint": endpoint, "status": None, "body": None, "prompt": None}
        state["log"].append(entry)
        try:
            plan = state["plan"].popleft() if state["plan"] else None
            if plan and plan.get("delay_s"):
                await asyncio.sleep(float(plan["delay_s"]))
            try:
                body = await request.json()
            except Exception:
                body = None
            entry["body"] = body if not isinstance(body, dict) else {k: v for k, v in body.items() if k != "messages"}
            if plan and plan.get("status"):
                status = int(plan["status"])
                entry["status"] = status
                headers = {"Retry-After": str(plan["retry_after"])} if plan.get("retry_after") is not None else None
                b = plan.get("body", f"injected failure {status}")
                resp = JSONResponse(b, status_code=status, headers=headers) if isinstance(b, dict) else error(status, str(b))
                if headers:
                    resp.headers.update(headers)
                return resp
            try:
                parsed = parse_chat(body, served_model_name) if endpoint == "chat" else parse_completion(body, served_model_name)
            except BadRequest as e:
                entry["status"] = e.status
                return error(e.status, str(e))
            entry["body"] = parsed.logged
            try:
                g = await gen.submit(parsed)
            except Exception as e:
                entry["status"] = 400
                return error(400, f"{type(e).__name__}: {e}")
            entry["prompt"] = parsed.logged.get("prompt")
            ch = response_choice(g, parsed)
            usage = {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.num_tokens, "total_tokens": g.prompt_tokens + g.num_tokens}
            rid = uuid.uuid4().hex
            if endpoint == "chat":
                out = {
                    "id": f"chatcmpl-{rid}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": served_model_name,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": ch["text"]},
                            "logprobs": None,
                            "finish_reason": ch["finish_reason"],
                            "stop_reason": ch["stop_reason"],
                        }
                    ],
                    "usage": usage,
                }
            else:
                out = {
                    "id": f"cmpl-{rid}",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": served_model_name,
                    "choices": [
                        {
                            "index": 0,
                            "text": ch["text"],
                            "logprobs": None,
                            "finish_reason": ch["finish_reason"],
                            "stop_reason": ch["stop_reason"],
                        }
                    ],
                    "usage": usage,
                }
            entry["status"] = 200
            if isinstance(body, dict) and body.get("stream"):
                from fastapi.responses import StreamingResponse

                opts = body.get("stream_options") or {}
                chunks = sse_chunks(out, include_usage=bool(opts.get("include_usage")))

                async def events():
                    for c in chunks:
                        yield c
                        await asyncio.sleep(0)

                return StreamingResponse(events(), media_type="text/event-stream")
            return JSONResponse(out)
        finally:
            state["in_flight"] -= 1

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completions")

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": served_model_name, "object": "model", "owned_by": "thyme-dev", "root": getattr(backend, "model_id", None)}],
        }

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/debug/fail")
    async def fail(request: Request):
        plan = await request.json()
        if isinstance(plan, dict):
            plan = [plan]
        state["plan"].extend(plan)
        return {"queued": len(state["plan"])}

    @app.get("/debug/requests")
    async def requests_log():
        return list(state["log"])

    @app.get("/debug/stats")
    async def stats():
        return {"max_in_flight": state["max_in_flight"], "in_flight": state["in_flight"], "requests": len(state["log"])}

    @app.post("/debug/reset")
    async def reset():
        state["plan"].clear()
        state["log"].clear()
        state["max_in_flight"] = 0
        return {"ok": True}

    return app


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    port_file: str | None = None,
    served_model_name: str | None = None,
    max_batch: int = 8,
    batch_wait_ms: float = 10.0,
    seed: int | None = None,
    threads: int | None = None,
) -> None:
    """Load ``model`` with the ``hf`` backend and serve it until interrupted (blocks).

    Raises:
        SystemExit: ``host`` is not a loopback address.
    """
    import uvicorn

    _check_loopback(host)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    backend = _vllm_style_backend(model, seed=seed)
    app = build_app(backend, served_model_name or model, max_batch=max_batch, batch_wait_s=batch_wait_ms / 1000.0)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY on its connections (thyme.serve.server.bind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    actual = sock.getsockname()[1]
    if port_file:
        tmp = port_file + ".tmp"
        Path(tmp).write_text(str(actual))
        os.replace(tmp, port_file)
    print(f"thyme dev server: {served_model_name or model} on http://{host}:{actual}/v1", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        app.state.generator.stop()


def run_transformers_serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, extra: list[str] | None = None) -> None:
    """``transformers serve MODEL --host HOST --port PORT [extra...]`` (blocks; module docstring)."""
    _check_loopback(host)
    from ..backends.processors import load_processor, torchvision_available

    if not torchvision_available():
        from transformers.cli.serving import model_manager

        original = model_manager.ModelManager._load_processor

        def _load_processor(self, model_id_and_revision, gguf_file=None):
            if gguf_file is not None:
                return original(self, model_id_and_revision, gguf_file)
            model_id, _, revision = model_id_and_revision.partition("@")
            return load_processor(model_id, revision=None if revision in ("", "main") else revision)

        model_manager.ModelManager._load_processor = _load_processor
    from transformers.cli.transformers import app

    args = ["serve", model, "--host", host, "--port", str(port), *(extra or [])]
    app(args=args, prog_name="transformers", standalone_mode=False)


def _check_loopback(host: str) -> None:
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to bind {host!r}: these dev servers have no authentication and test-only endpoints; use 127.0.0.1")


# --------------------------------------------------------------------------- subprocess helper


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A server started by :func:`start_server`; :meth:`stop` (or ``with``) ends it."""

    proc: subprocess.Popen
    base_url: str
    model: str
    log_path: Path
    kind: str

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    model: str | os.PathLike,
    *,
    kind: str = "thyme",
    served_model_name: str | None = None,
    host: str = "127.0.0.1",
    startup_timeout_s: float = 120.0,
    log_dir: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
) -> ServerProcess:
    """Start ``serve`` (``kind="thyme"``) or ``transformers`` (``kind="transformers"``) as a
    subprocess on ``host`` and wait until ``GET /health`` answers.

    Raises:
        RuntimeError: the process exited or did not answer within ``startup_timeout_s``
            (the message carries the end of its log).
    """
    import httpx

    model = os.fspath(model)
    log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="thyme-dev-server-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{kind}-server.log"
    src_root = str(Path(__file__).resolve().parents[2])
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = src_root + (os.pathsep + child_env["PYTHONPATH"] if child_env.get("PYTHONPATH") else "")
    child_env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    child_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    child_env.update(env or {})
    cmd = [sys.executable, "-m", "thyme.cli", "dev"]
    port_file = None
    if kind == "thyme":
        port_file = log_dir / f"port-{uuid.uuid4().hex[:8]}"
        cmd += ["serve", model, "--host", host, "--port", "0", "--port-file", str(port_file)]
        if served_model_name:
            cmd += ["--served-model-name", served_model_name]
        port = None
    elif kind == "transformers":
        port = free_port(host)
        cmd += ["transformers-serve", model, "--host", host, "--port", str(port)]
    else:
        raise ValueError(f"unknown server kind {kind!r} (thyme or transformers)")
    cmd += list(extra_args or [])
    log_f = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log_f, stderr=subprocess.STDOUT, env=child_env, stdin=subprocess.DEVNULL)
    log_f.close()
    name = served_model_name or model
    deadline = time.monotonic() + startup_timeout_s
    handle = ServerProcess(proc, "", name, log_path, kind)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} server exited with status {proc.returncode} during start-up:\n{handle.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind} server did not answer within {startup_timeout_s:g} s:\n{handle.log_tail()}")
            if port is None and port_file is not None and port_file.exists():
                port = int(port_file.read_text().strip())
            if port is not None:
                url = f"http://{host}:{port}"
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=2.0, trust_env=False).status_code == 200:
                        handle.base_url = url + "/v1"
                        return handle
            time.sleep(0.2)
    except BaseException:
        handle.stop(timeout=5)
        raise
