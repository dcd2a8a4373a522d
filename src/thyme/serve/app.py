"""The HTTP surface of ``thyme serve``: an OpenAI-compatible FastAPI app over a :class:`Service`.

Routes:

- ``POST /v1/chat/completions``: the whole Thyme loop per request (:mod:`thyme.serve.service`);
  ``choices[0].message.content`` is the answer (``content: full``: the whole response text),
  the extra field ``thyme`` the trajectory, ``usage`` the model tokens (prompt and completion,
  summed over the rounds, as the backend reported them). The request's ``model`` must be the
  served name (or be left out): another gets 404 ``model_not_found``. ``stream: true``:
  server-sent events, ``data: {chunk}`` lines then ``data: [DONE]``: the model's text as
  ``delta.reasoning_content`` deltas (``delta.content`` when ``content: full``), each sandbox
  output as a chunk whose ``thyme`` field is the event (plain clients ignore it), the answer
  as ``delta.content`` in the last chunk (``content: answer``), which also carries
  ``finish_reason``, ``usage`` and the whole ``thyme`` trajectory.
- ``GET /health``, ``GET /v1/models``, ``GET /metrics`` (Prometheus text: requests, in flight,
  queued, rounds, sandbox and generation seconds, disconnects, errors by kind).
- ``GET /``: the web demo (:mod:`thyme.serve.demo`; its static files need no key, its API calls do).

Access: with an API key set, every request (but the demo's static files) needs ``Authorization: Bearer KEY`` (401 otherwise;
compared in constant time). Errors are OpenAI-shaped bodies ``{"error": {message, type,
param, code}}``: 400 (a limit, named in ``param``), 401, 404 (``model_not_found``), 429
(``Retry-After``), 500 (the trajectory failed: its error without traceback). A client that
goes away before its trajectory starts (queued, or before the first byte of its stream) runs
none; one that goes away later stops its trajectory at the next model or sandbox event.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import shutil
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from .demo import PUBLIC_PATHS, add_demo_routes
from .inputs import RequestError
from .service import Service, finish_reason, usage


def _max_body(service: Service) -> int:
    """Largest request body read (bytes): base64 (4/3) of max_images * max_image_bytes, the question, 1 MiB of the rest."""
    c = service.config
    return (c.max_images * c.max_image_bytes * 4) // 3 + c.max_question_chars * 4 + (1 << 20)


def build_app(service: Service, *, api_key: str | None = None) -> Any:
    """The FastAPI app serving ``service`` (module docstring); ``api_key``: the bearer token every
    request must carry (None: none needed; only for loopback, which the command enforces)."""
    app = FastAPI(title="thyme serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def error(e: RequestError) -> JSONResponse:
        service.errors[e.kind] = service.errors.get(e.kind, 0) + 1
        headers = {"Retry-After": str(service.config.retry_after_s)} if e.status == 429 else None
        if e.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    if api_key is not None:  # a plain ASGI layer (BaseHTTPMiddleware would hide client disconnects)
        app.add_middleware(_BearerAuth, key=api_key, refuse=error, public=PUBLIC_PATHS)
    add_demo_routes(app)

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok", "running": service.running, "queued": service.admitted - service.running}

    @app.get("/metrics")
    async def metrics() -> Any:
        return PlainTextResponse(service.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0, "owned_by": "thyme"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        service.counts["requests"] += 1
        try:
            body = await _read_json(request, _max_body(service))
            if body.get("n") not in (None, 1):
                raise RequestError("only n=1 is served (one trajectory per request)", param="n")
            check_model(body.get("model"), service.model_name)
            await service.acquire()
        except RequestError as e:
            return error(e)
        try:
            folder, parsed, cfg, limits = await asyncio.to_thread(service.prepare, body)
        except BaseException as e:
            service.release()
            if isinstance(e, RequestError):
                return error(e)
            raise
        loop = asyncio.get_running_loop()

        def free() -> None:
            """Free the request's session (on the loop), then remove its folder in a thread:
            removing is disk I/O (about 8 ms on an ext4 VM disk) that would hold the response
            and stall the event loop every other request uses. uvicorn's loop waits for the
            removals before it closes."""
            service.release()
            try:
                loop.run_in_executor(None, shutil.rmtree, folder, True)
            except RuntimeError:  # the executor is shutting down
                shutil.rmtree(folder, ignore_errors=True)

        if await request.is_disconnected():  # gone while queued or prepared: run nothing for nobody
            free()
            service.counts["disconnected"] += 1
            return Response(status_code=499)
        cancel = threading.Event()
        reply = _Reply(f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), service.model_name, service.config.content)

        def finish(fut: Any) -> None:
            """Free the session and the request's folder once the trajectory has ended."""

            def now(_f: Any = None) -> None:
                free()  # on the event loop: asyncio runs a future's callbacks there

            if fut.done():
                now()
            else:
                fut.add_done_callback(now)

        if not body.get("stream"):
            fut = loop.run_in_executor(service.pool, service.answer, folder, parsed, cfg, limits, None, cancel)
            try:
                while not fut.done():  # a client that goes away stops its trajectory at its next event
                    await asyncio.wait({fut}, timeout=0.5)
                    if not fut.done() and not cancel.is_set() and await request.is_disconnected():
                        cancel.set()
                        service.counts["disconnected"] += 1
                traj, field = fut.result()
                payload = reply.completion(traj, field)
            except asyncio.CancelledError:  # the client went away: stop the trajectory
                cancel.set()
                service.counts["disconnected"] += 1
                raise
            finally:
                finish(fut)
            if traj.stop_reason == "error":
                service.errors["trajectory_error"] = service.errors.get("trajectory_error", 0) + 1
                return JSONResponse({**_trajectory_error(payload["thyme"]), "thyme": payload["thyme"]}, status_code=500)
            return JSONResponse(payload)

        queue: asyncio.Queue = asyncio.Queue()

        def on_event(kind: str, payload: Any) -> None:
            if kind == "text":
                loop.call_soon_threadsafe(queue.put_nowait, ("text", payload))
            elif kind == "feedback":
                loop.call_soon_threadsafe(queue.put_nowait, ("feedback", payload))  # feedback_event(): built by the service

        fut = loop.run_in_executor(service.pool, service.answer, folder, parsed, cfg, limits, on_event, cancel)
        fut.add_done_callback(lambda _f: queue.put_nowait(("end", None)))

        async def stream() -> Any:
            ended = False
            try:
                yield _sse(reply.chunk({"role": "assistant", "content": ""}))
                key = "content" if reply.content_mode == "full" else "reasoning_content"
                while True:
                    kind, payload = await queue.get()
                    if kind == "text":
                        yield _sse(reply.chunk({key: payload}))
                    elif kind == "feedback":
                        yield _sse(reply.chunk({"content": payload["text"]} if reply.content_mode == "full" else {}, thyme=payload))
                    else:
                        break
                traj, field = fut.result()
                if traj.stop_reason == "error":
                    service.errors["trajectory_error"] = service.errors.get("trajectory_error", 0) + 1
                    yield _sse({**_trajectory_error(field), "thyme": field})
                else:
                    delta = {"content": traj.answer or ""} if reply.content_mode == "answer" else {}
                    last = reply.chunk(delta, finish=finish_reason(traj), thyme={"event": "done", **field})
                    last["usage"] = usage(traj)
                    yield _sse(last)
                yield "data: [DONE]\n\n"
                ended = True
            finally:
                if not ended:
                    cancel.set()  # the client went away: the trajectory stops at its next event
                    service.counts["disconnected"] += 1

        def never_streamed() -> None:
            """The response ended before the stream's body was sent whole, possibly before
            its generator ran (on an ASGI 2.4 server the start fails when the client is gone
            and Starlette raises before the generator starts, so its ``finally`` never
            runs): stop the trajectory here."""
            if not cancel.is_set() and not fut.done():
                cancel.set()
                service.counts["disconnected"] += 1

        # the session is freed when the trajectory ends, whether or not the stream was read
        finish(fut)
        return _EventStream(
            stream(), never_streamed, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    return app


def check_model(model: Any, served: str) -> None:
    """The request's ``model`` must be the served name; an omitted one (``None``) means it too
    (curl users and the demo page need not know it; OpenAI SDKs always send one).

    Raises:
        RequestError: 404 with code ``model_not_found`` naming the served model (OpenAI's
            answer to an unknown model), 400 when ``model`` is not a string.
    """
    if model is None:
        return
    if not isinstance(model, str):
        raise RequestError(f"'model' must be a string, got {type(model).__name__}", param="model")
    if model != served:
        raise RequestError(
            f"the model {model[:200]!r} does not exist: this server serves {served!r} (GET /v1/models)",
            status=404,
            param="model",
            code="model_not_found",  # OpenAI's answer: type invalid_request_error, code model_not_found
        )


class _EventStream(StreamingResponse):
    """A streamed response that calls ``on_unfinished`` when it ends before its body was
    wholly sent (client gone, cancelled), started or not."""

    def __init__(self, content: Any, on_unfinished: Any, **kw: Any):
        super().__init__(content, **kw)
        self._on_unfinished = on_unfinished
        self._sent_all = False

    async def stream_response(self, send: Any) -> None:
        await super().stream_response(send)
        self._sent_all = True

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._sent_all:
                self._on_unfinished()


class _BearerAuth:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer KEY`` (compared in
    constant time); otherwise ``refuse`` answers 401. ``public``: paths a ``GET`` / ``HEAD``
    reaches without the key (the demo's static files)."""

    def __init__(self, app: Any, *, key: str, refuse: Any, public: frozenset[str] = frozenset()):
        self.app, self.key, self.refuse, self.public = app, key.encode(), refuse, public

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not (scope.get("method") in ("GET", "HEAD") and scope.get("path") in self.public):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = self.refuse(
                    RequestError("missing or wrong API key (send 'Authorization: Bearer KEY')", status=401, kind="authentication_error")
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _trajectory_error(field: dict[str, Any]) -> dict[str, Any]:
    return {
        "error": {
            "message": f"the trajectory failed: {field.get('error')}",
            "type": "trajectory_error",
            "param": None,
            "code": "trajectory_error",
        }
    }


class _Reply:
    """The fixed parts of one response (id, created, model) and its content mode."""

    def __init__(self, rid: str, created: int, model: str, content_mode: str):
        self.rid, self.created, self.model, self.content_mode = rid, created, model, content_mode

    def chunk(self, delta: dict[str, Any], *, finish: str | None = None, thyme: Any = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.rid,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if thyme is not None:
            out["thyme"] = thyme
        return out

    def completion(self, traj: Any, field: dict[str, Any]) -> dict[str, Any]:
        content = (traj.answer or "") if self.content_mode == "answer" else traj.response_text()
        return {
            "id": self.rid,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason(traj)}],
            "usage": usage(traj),
            "thyme": field,
        }


async def _read_json(request: Any, cap: int) -> dict[str, Any]:
    """The request body as a JSON object, at most ``cap`` bytes read.

    Raises:
        RequestError: too large (413), not JSON, not an object.
    """
    from ..http import loads_bounded

    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > cap:
        raise RequestError(f"the request body is larger than {cap} bytes", status=413, param="max_image_bytes", kind="limit_exceeded")
    chunks, n = [], 0
    async for c in request.stream():
        n += len(c)
        if n > cap:
            raise RequestError(f"the request body is larger than {cap} bytes", status=413, param="max_image_bytes", kind="limit_exceeded")
        chunks.append(c)
    try:
        body = loads_bounded(b"".join(chunks))
    except ValueError as e:
        raise RequestError(f"the request body is not JSON ({e})", param="body") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", param="body")
    return body


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
