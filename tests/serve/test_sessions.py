"""Load on ``thyme serve``: at most ``max_sessions`` trajectories run, a bounded queue waits, 429
with ``Retry-After`` beyond; one failing request answers alone and never affects the others."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from thyme.backends.base import Backend

from .conftest import running_server, user_message


class Gate(Backend):
    """The scripted backend, held while ``gate`` is closed for questions containing 'slow', and
    failing for questions containing 'boom' (an upstream error)."""

    name = "gate"

    def __init__(self, inner):
        self.inner, self.gate, self.waiting = inner, threading.Event(), 0
        self.capabilities = inner.capabilities

    def generate(self, requests, stream=None):
        text = json.dumps([r.messages for r in requests])
        if "boom" in text:
            raise ConnectionError("upstream exploded")
        if "slow" in text:
            self.waiting += 1
            assert self.gate.wait(60), "the test never opened the gate"
        return self.inner.generate(requests, stream=stream)


def _post(url, question, **kw):
    return httpx.post(url + "/v1/chat/completions", json={"model": "thyme-test", "messages": user_message(question), **kw}, timeout=90)


def _until(cond, what):
    deadline = time.monotonic() + 30
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_beyond_sessions_and_queue_a_request_gets_429_with_retry_after(scripted, sandbox):
    backend = Gate(scripted)
    with running_server(backend, sandbox, max_sessions=1, max_queue=1, retry_after_s=7) as srv, ThreadPoolExecutor(2) as ex:
        running = ex.submit(_post, srv.url, "slow one")
        _until(lambda: backend.waiting == 1, "the first request never reached the model")
        queued = ex.submit(_post, srv.url, "slow two")
        _until(lambda: srv.service.admitted == 2, "the second request was never queued")
        r = _post(srv.url, "a third")
        assert r.status_code == 429
        assert r.headers["retry-after"] == "7"
        assert r.json()["error"]["param"] == "max_sessions"
        assert srv.service.running == 1  # the queued one waits for the session
        backend.gate.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200
        assert srv.service.admitted == 0
        assert _post(srv.url, "a fourth").json()["choices"][0]["message"]["content"] == "B"  # the slot came back


def test_a_failing_request_does_not_affect_a_concurrent_good_one(scripted, sandbox):
    backend = Gate(scripted)
    with running_server(backend, sandbox, max_sessions=3) as srv, ThreadPoolExecutor(3) as ex:
        good = ex.submit(_post, srv.url, "slow and good")
        _until(lambda: backend.waiting == 1, "the good request never reached the model")
        bad = _post(srv.url, "boom")
        broken = httpx.post(
            srv.url + "/v1/chat/completions",
            json={"messages": user_message(url="data:image/png;base64,AAAA")},
            timeout=30,
        )
        backend.gate.set()
        ok = good.result()
    assert bad.status_code == 500
    err = bad.json()["error"]
    assert err["type"] == "trajectory_error" and "upstream exploded" in err["message"] and "Traceback" not in err["message"]
    assert broken.status_code == 400
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "B"


def test_a_failing_streamed_request_ends_with_an_error_event(scripted, sandbox):
    backend = Gate(scripted)
    with running_server(backend, sandbox) as srv:
        with httpx.stream(
            "POST", srv.url + "/v1/chat/completions", json={"messages": user_message("boom"), "stream": True}, timeout=60
        ) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert srv.service.admitted == 0
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: ") :])
    assert "upstream exploded" in last["error"]["message"]


def test_a_client_that_disconnects_stops_its_trajectory_and_frees_its_session(scripted, sandbox):
    backend = Gate(scripted)
    with running_server(backend, sandbox, max_sessions=1, max_queue=0) as srv:
        with httpx.stream(
            "POST", srv.url + "/v1/chat/completions", json={"messages": user_message("slow"), "stream": True}, timeout=60
        ) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: ")
            _until(lambda: backend.waiting == 1, "the request never reached the model")
        _until(lambda: srv.service.counts["disconnected"] == 1, "the disconnect was not seen")
        backend.gate.set()  # the model's next text event stops the trajectory
        _until(lambda: srv.service.admitted == 0, "the session was not freed")
        assert len(scripted.requests) == 1  # no second round after the disconnect
        assert _post(srv.url, "after").json()["choices"][0]["message"]["content"] == "B"


def test_a_plain_request_whose_client_goes_away_stops_too(scripted, sandbox):
    backend = Gate(scripted)
    with running_server(backend, sandbox, max_sessions=1, max_queue=0) as srv, ThreadPoolExecutor(1) as ex:
        gone = ex.submit(lambda: httpx.post(srv.url + "/v1/chat/completions", json={"messages": user_message("slow")}, timeout=1.5))
        _until(lambda: backend.waiting == 1, "the request never reached the model")
        assert isinstance(gone.exception(), httpx.TimeoutException)  # the client gave up and closed
        _until(lambda: srv.service.counts["disconnected"] == 1, "the disconnect was not seen")
        backend.gate.set()
        _until(lambda: srv.service.admitted == 0, "the session was not freed")
        assert len(scripted.requests) == 1


class Overlap(Backend):
    """The scripted backend, recording the most generate calls ever in flight at once; the first
    call waits until ``ready()`` holds (every session is running), so the others can pile up."""

    name = "overlap"

    def __init__(self, inner, ready):
        self.inner, self.ready, self.now, self.most, self.calls, self.lock = inner, ready, 0, 0, 0, threading.Lock()
        self.capabilities = inner.capabilities

    def generate(self, requests, stream=None):
        with self.lock:
            self.now += 1
            self.calls += 1
            first = self.calls == 1
            self.most = max(self.most, self.now)
        try:
            if first:
                _until(self.ready, "the sessions never all ran")
            return self.inner.generate(requests, stream=stream)
        finally:
            with self.lock:
                self.now -= 1


@pytest.mark.parametrize("local", [True, False])
def test_a_local_model_generates_for_one_session_at_a_time(local, scripted, sandbox):
    """The hf backend (one model in this process) is called by one session at a time; an upstream
    server's backend by every session at once."""
    box = {}

    def ready() -> bool:
        if local:  # all four sessions are in their trajectories, and a moment passes for them to reach the model
            return box["srv"].service.running == 4 and (time.sleep(0.3) or True)
        return box["backend"].most >= 2  # a second call reached the model while the first was held

    box["backend"] = backend = Overlap(scripted, ready)
    with running_server(backend, sandbox, local=local, max_sessions=4) as srv, ThreadPoolExecutor(4) as ex:
        box["srv"] = srv
        replies = list(ex.map(lambda i: _post(srv.url, f"question {i}"), range(4)))
    assert all(r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "B" for r in replies), [
        (r.status_code, r.text[-400:]) for r in replies
    ]
    assert backend.most == 1 if local else backend.most >= 2


def test_stopping_the_server_answers_the_requests_in_flight_first(scripted, sandbox):
    """What SIGTERM / Ctrl-C do (uvicorn's should_exit): no new connection is taken, the
    trajectories in flight (plain and streamed) finish and are answered, then the server stops."""
    backend = Gate(scripted)
    with running_server(backend, sandbox, max_sessions=2) as srv, ThreadPoolExecutor(2) as ex:

        def streamed():
            with httpx.stream(
                "POST", srv.url + "/v1/chat/completions", json={"messages": user_message("slow s"), "stream": True}, timeout=60
            ) as r:
                return [line for line in r.iter_lines() if line.startswith("data: ")]

        plain = ex.submit(_post, srv.url, "slow p")
        stream = ex.submit(streamed)
        _until(lambda: backend.waiting == 2, "the requests never reached the model")
        srv.server.should_exit = True
        time.sleep(0.3)
        assert srv.thread.is_alive()  # still draining
        backend.gate.set()
        assert plain.result().json()["choices"][0]["message"]["content"] == "B"
        lines = stream.result()
        assert lines[-1] == "data: [DONE]" and '"content": "B"' in lines[-2]
        srv.thread.join(30)
        assert not srv.thread.is_alive()
