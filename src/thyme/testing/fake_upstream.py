"""An instant, scripted OpenAI-compatible upstream with injected faults, for load tests and
benchmarks of ``thyme serve --base-url`` (the ``openai`` backend's real HTTP client, its
retries and its deadline on the failure paths).

:class:`FakeUpstream` runs a real HTTP server (Starlette on uvicorn, loopback only, a free
port) in a thread of its own with its own event loop. ``POST /v1/chat/completions`` answers
what a vLLM server would for Thyme's requests (``include_stop_str_in_output``: the text up to
and with the stop string, ``stop_reason``, ``usage``; with ``"stream": true`` the same answer
as server-sent events in 4-character pieces), with no model behind it:

- the round is the number of ``</sandbox_output>`` in the request's assistant message (the
  backend continues that message each round);
- the question (the user message's text) chooses the script and the fault, by tags:
  ``[code]`` writes :data:`CODE` (crop the input, save and print it) in round 0, then
  :data:`ANSWER`; ``[code:loop]``, ``[code:exit]``, ``[code:error]`` write the
  :data:`FAULTY_CODE` of that name instead; without any, :data:`ANSWER` at once. ``[fail@K]``: every call of round ``K``
  is answered HTTP 500 (retries too, so the request fails); ``[hang@K]``: every call of round
  ``K`` waits :attr:`FakeUpstream.hang_s` seconds before answering (past the client's
  deadline: a timeout; the wait ends early when the client closes the connection);
  ``[hold@K]``: round ``K`` waits until :meth:`FakeUpstream.release` (a benchmark holds many
  trajectories active at once, their sandbox sessions open); ``[slow@K]``: round ``K`` answers
  after :attr:`FakeUpstream.slow_s` seconds (within the deadline: a client can go away meanwhile);
- ``usage``: ``prompt_tokens`` = the request body's bytes // 4, ``completion_tokens`` = the
  answer's characters // 4 (deterministic, so a test can check what ``thyme serve`` sums).

``GET /v1/models`` lists :attr:`FakeUpstream.model`. :attr:`FakeUpstream.stats` counts calls by
outcome (``answered``, ``failed``, ``hung``, ``held``) and keeps each answered call's service
time (from the request's first byte read to the answer built; seconds) in ``service_s``, so a
benchmark can subtract the upstream's own time from what a client saw, and the ``usage`` it
reported in ``usage``.

Never imported by the runtime (floor 7: testing).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from typing import Any

#: Round 0 of a ``[code]`` question: crop the input image in the sandbox, save and print the crop.
CODE = (
    "<think>Zoom in.\n<code>\n```python\nfrom PIL import Image\nimg = Image.open(image_path)\n"
    "img.crop((0, 0, 32, 24)).save('/mnt/data/temp_processed_images/crop.png')\n"
    "print('/mnt/data/temp_processed_images/crop.png')\n```\n</code>"
)
#: Round 0 of ``[code:KIND]`` questions: code the sandbox must contain (a loop past its time
#: limit, a process that exits under it, an exception); round 1 answers all the same.
FAULTY_CODE = {
    "loop": "<think>Spin.\n<code>\n```python\nwhile True:\n    pass\n```\n</code>",
    "exit": "<think>Leave.\n<code>\n```python\nimport os\nos._exit(3)\n```\n</code>",
    "error": "<think>Divide.\n<code>\n```python\nprint(1 / 0)\n```\n</code>",
}
#: The last round of every question.
ANSWER = "<think>The sign reads STOP.</think>\n<answer>B</answer>"
OUTPUT_END = "</sandbox_output>"
_FAULT = re.compile(r"\[(fail|hang|hold|slow)@(\d+)\]")


def _texts(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def plan(body: dict[str, Any]) -> tuple[int, str, str | None]:
    """``(round, segment, fault)`` of one chat request (module docstring); ``fault`` is
    ``"fail"``, ``"hang"``, ``"hold"``, ``"slow"`` or None."""
    msgs = body.get("messages") or []
    user = " ".join(_texts(m.get("content")) for m in msgs if isinstance(m, dict) and m.get("role") == "user")
    assistant = "".join(_texts(m.get("content")) for m in msgs if isinstance(m, dict) and m.get("role") == "assistant")
    rnd = assistant.count(OUTPUT_END)
    faulty = re.search(r"\[code:(\w+)\]", user)
    if faulty and faulty.group(1) in FAULTY_CODE:
        segments = [FAULTY_CODE[faulty.group(1)], ANSWER]
    else:
        segments = [CODE, ANSWER] if "[code]" in user else [ANSWER]
    fault = next((kind for kind, k in _FAULT.findall(user) if int(k) == rnd), None)
    return rnd, segments[min(rnd, len(segments) - 1)], fault


class FakeUpstream:
    """The server of the module docstring; a context manager (``with FakeUpstream() as up:
    up.base_url``).

    Args:
        model: the served model name.
        hang_s: how long a ``[hang@K]`` call waits before answering (seconds).
        slow_s: how long a ``[slow@K]`` call waits before answering (seconds).
        host: the loopback address to bind.
    """

    def __init__(self, model: str = "fake", *, hang_s: float = 30.0, slow_s: float = 0.5, host: str = "127.0.0.1"):
        self.model, self.hang_s, self.slow_s, self.host = model, hang_s, slow_s, host
        self.lock = threading.Lock()
        self.stats: dict[str, Any] = {"answered": 0, "failed": 0, "hung": 0, "held": 0, "service_s": [], "usage": []}
        self.released = threading.Event()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def reset(self) -> None:
        with self.lock:
            self.stats = {"answered": 0, "failed": 0, "hung": 0, "held": 0, "service_s": [], "usage": []}

    def release(self) -> None:
        """Let every ``[hold@K]`` call (now and later) answer."""
        self.released.set()

    def _app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def models(_request: Any) -> Any:
            return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "fake"}]})

        async def chat(request: Any) -> Any:
            t0 = time.perf_counter()
            raw = await request.body()
            try:
                body = json.loads(raw)
                assert isinstance(body, dict)
            except Exception:  # noqa: BLE001
                return JSONResponse({"error": {"message": "not a JSON object", "type": "invalid_request_error"}}, status_code=400)
            if body.get("model") != self.model:
                return JSONResponse({"error": {"message": f"no model {body.get('model')!r}", "type": "NotFoundError"}}, status_code=404)
            rnd, text, fault = plan(body)
            if fault == "fail":
                with self.lock:
                    self.stats["failed"] += 1
                return JSONResponse(
                    {"error": {"message": f"injected failure (round {rnd})", "type": "InternalServerError"}}, status_code=500
                )
            if fault == "hang":
                with self.lock:
                    self.stats["hung"] += 1
                end = time.monotonic() + self.hang_s
                while time.monotonic() < end:  # until the client gives up (its deadline) or hang_s
                    if await request.is_disconnected():
                        return JSONResponse({"error": {"message": "the client went away"}}, status_code=499)
                    await asyncio.sleep(0.05)
            if fault == "slow":
                await asyncio.sleep(self.slow_s)
                t0 = time.perf_counter()  # the wait is not service time
                fault = None
            if fault == "hold":
                with self.lock:
                    self.stats["held"] += 1
                while not self.released.is_set():
                    if await request.is_disconnected():
                        return JSONResponse({"error": {"message": "the client went away"}}, status_code=499)
                    await asyncio.sleep(0.02)
                t0 = time.perf_counter()  # the hold is not service time
                fault = None
            stop = next((s for s in ("</code>", "</answer>") if text.endswith(s)), None)
            out = {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 0,
                "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "stop_reason": stop}],
                "usage": {
                    "prompt_tokens": len(raw) // 4,
                    "completion_tokens": len(text) // 4,
                    "total_tokens": len(raw) // 4 + len(text) // 4,
                },
            }
            if body.get("stream"):  # vLLM's server-sent events, the text in small pieces
                from starlette.responses import StreamingResponse

                from .openai_server import sse_chunks

                chunks = sse_chunks(out, include_usage=bool((body.get("stream_options") or {}).get("include_usage")))

                async def events() -> Any:
                    for c in chunks:
                        yield c
                        await asyncio.sleep(0)

                response = StreamingResponse(events(), media_type="text/event-stream")
            else:
                response = JSONResponse(out)
            with self.lock:
                self.stats["usage"].append(dict(out["usage"]))
            if fault is None:
                with self.lock:
                    self.stats["answered"] += 1
                    self.stats["service_s"].append(time.perf_counter() - t0)
            return response

        return Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])])

    def start(self) -> "FakeUpstream":
        """Bind a free loopback port and serve in a daemon thread (returns once it answers).

        Raises:
            RuntimeError: the server did not start within 30 s.
        """
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # see thyme.serve.server.bind
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        self._sock = sock
        config = uvicorn.Config(self._app(), log_level="error", access_log=False, timeout_graceful_shutdown=1, backlog=1024)
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # older uvicorn
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True, name="fake-upstream")
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake upstream did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving (hanging calls are cut after a second)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()

    def __enter__(self) -> "FakeUpstream":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
