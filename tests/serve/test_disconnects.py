"""A streamed client that goes away before the first byte of its answer was sent (while queued,
or while its request was being prepared) runs no trajectory: its session is freed and the model
is never called for it."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from .conftest import running_server, user_message
from .test_sessions import Gate


def _until(cond, what):
    deadline = time.monotonic() + 30
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _send_and_close(url: str, body: dict) -> None:
    """POST ``body`` on a raw socket, then close it without reading a byte of the answer."""
    host, port = url.removeprefix("http://").split(":")
    raw = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(raw)}\r\n\r\n".encode()
            + raw
        )


def _connections(srv) -> int:
    return len(srv.server.server_state.connections)


def test_a_streamed_client_gone_while_queued_runs_no_trajectory(scripted, sandbox):
    backend = Gate(scripted)
    with running_server(backend, sandbox, max_sessions=1, max_queue=1) as srv, ThreadPoolExecutor(1) as ex:
        first = ex.submit(httpx.post, srv.url + "/v1/chat/completions", json={"messages": user_message("slow first")}, timeout=60)
        _until(lambda: backend.waiting == 1, "the first request never reached the model")
        busy = _connections(srv)
        _send_and_close(srv.url, {"messages": user_message("queued then gone"), "stream": True})
        _until(lambda: srv.service.admitted == 2, "the second request was never queued")
        _until(lambda: _connections(srv) == busy, "the server never saw the client go")
        backend.gate.set()
        assert first.result().status_code == 200
        _until(lambda: srv.service.admitted == 0, "the session was not freed")
        assert srv.service.counts["disconnected"] == 1
    asked = [json.dumps(r.messages) for r in scripted.requests]
    assert len(asked) == 2 and not any("queued then gone" in a for a in asked)  # the first's two rounds only


def test_a_streamed_client_gone_before_the_first_byte_runs_no_trajectory(scripted, sandbox):
    with running_server(scripted, sandbox) as srv:
        held, entered = threading.Event(), threading.Event()
        prepare = srv.service.prepare

        def slow_prepare(body):
            entered.set()
            assert held.wait(30)
            return prepare(body)

        srv.service.prepare = slow_prepare
        busy = _connections(srv)
        _send_and_close(srv.url, {"messages": user_message("gone early"), "stream": True})
        assert entered.wait(30)
        _until(lambda: _connections(srv) == busy, "the server never saw the client go")
        held.set()
        _until(lambda: srv.service.admitted == 0, "the session was not freed")
        assert srv.service.counts["disconnected"] == 1
        srv.service.prepare = prepare
        ok = httpx.post(srv.url + "/v1/chat/completions", json={"messages": user_message()}, timeout=60)
        assert ok.json()["choices"][0]["message"]["content"] == "B"
    assert len(scripted.requests) == 2  # the later request's two rounds; none for the one that went away


def test_a_stream_cut_before_its_generator_ran_still_stops_the_trajectory():
    """A server on ASGI spec 2.4 fails the response's start when the client is gone (Starlette
    then raises before the body's generator ever ran, so its ``finally`` never runs): the
    response itself reports the unfinished stream. A stream sent whole reports nothing."""
    import asyncio
    import contextlib

    from thyme.serve.app import _EventStream

    started, unfinished, sent = [], [], []

    async def body():
        started.append(True)
        yield "data: x\n\n"

    async def receive():
        await asyncio.sleep(30)
        return {"type": "http.disconnect"}

    async def gone(message):
        raise OSError("the client went away")

    async def send(message):
        sent.append(message["type"])

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST", "path": "/", "headers": []}
    response = _EventStream(body(), lambda: unfinished.append(True), media_type="text/event-stream")
    from starlette.requests import ClientDisconnect

    with contextlib.suppress(ClientDisconnect):
        asyncio.run(response(scope, receive, gone))
    assert unfinished == [True] and started == []

    whole = _EventStream(body(), lambda: unfinished.append("whole"), media_type="text/event-stream")
    asyncio.run(whole(scope, receive, send))
    assert started == [True] and "http.response.body" in sent and unfinished == [True]
