"""The ``openai`` backend's streamed requests (a ``stream`` callback): server-sent events read
through :func:`thyme.http.fetch_events` within the client's limits, deltas passed on as they
arrive, the same :class:`Generation` as the non-streamed answer, no retry once text was shown.

Servers: :class:`thyme.testing.fake_upstream.FakeUpstream` (vLLM's answers, streamed in pieces)
and a handwritten HTTP server whose answers are scripted byte by byte (drops, floods, hangs).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import pytest

from thyme.backends.base import GenerationRequest
from thyme.backends.openai import OpenAIBackend, OpenAIServerError
from thyme.http import BadResponse, ConnectFailed, HTTPLimits, RequestTimeout, ResponseTooLarge, async_client, fetch_events
from thyme.testing.fake_upstream import CODE, FakeUpstream

STOPS = ["</code>", "</answer>"]


def _request(question: str = "[code] what is it?") -> GenerationRequest:
    return GenerationRequest([{"role": "user", "content": [{"type": "text", "text": question}]}], max_new_tokens=64, stop=list(STOPS))


def _chunk(text: str | None = None, finish=None, stop=None, usage=None) -> bytes:
    ev: dict = {"object": "chat.completion.chunk", "choices": []}
    if text is not None or finish is not None:
        ev["choices"] = [{"index": 0, "delta": {"content": text or ""}, "finish_reason": finish, "stop_reason": stop}]
    if usage is not None:
        ev["usage"] = usage
    return b"data: " + json.dumps(ev).encode() + b"\n\n"


class ScriptedServer:
    """A loopback HTTP/1.1 server; connection ``k`` is answered by ``scripts[min(k, last)]``: a
    list of steps, each bytes (sent), an Event (waited for, 10 s at most), ``"close"`` or
    ``"hang"`` (the connection is held until the server stops)."""

    def __init__(self, scripts):
        self.scripts, self.connections, self.stopped = scripts, 0, threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            k, self.connections = self.connections, self.connections + 1
            threading.Thread(target=self._serve, args=(conn, self.scripts[min(k, len(self.scripts) - 1)]), daemon=True).start()

    def _serve(self, conn, script):
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            n = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            while len(body) < n:
                body += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            for step in script:
                if isinstance(step, threading.Event):
                    step.wait(10)
                elif step == "close":
                    return
                elif step == "hang":
                    self.stopped.wait(30)
                    return
                else:
                    try:
                        conn.sendall(step)
                    except OSError:  # the client hung up (a capped flood): expected
                        return

    def close(self):
        self.stopped.set()
        self.sock.close()


@pytest.fixture
def scripted():
    servers = []

    def make(*scripts):
        servers.append(ScriptedServer(list(scripts)))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


# --------------------------------------------------------------------------- the backend


def test_streamed_round_equals_the_non_streamed_one_and_comes_in_pieces():
    with FakeUpstream() as up, OpenAIBackend(up.base_url, up.model, max_retries=0) as b:
        whole = b.generate([_request()])[0]
        deltas: list[tuple[int, str]] = []
        streamed = b.generate([_request()], stream=lambda i, d: deltas.append((i, d)))[0]
        reported = up.stats["usage"][-1]
    assert whole.text == CODE and whole.stop == "</code>"
    # the fake counts prompt tokens from the body's bytes, and the streamed body has two fields more
    assert (streamed.text, streamed.finish_reason, streamed.stop) == (whole.text, whole.finish_reason, whole.stop)
    assert (streamed.num_tokens, streamed.prompt_tokens) == (reported["completion_tokens"], reported["prompt_tokens"])
    assert streamed.num_tokens == whole.num_tokens > 0
    assert len(deltas) > 5 and {i for i, _ in deltas} == {0}
    assert "".join(d for _, d in deltas) == whole.text


def test_a_batch_streams_each_request_under_its_index():
    with FakeUpstream() as up, OpenAIBackend(up.base_url, up.model, max_retries=0) as b:
        got: dict[int, list[str]] = {0: [], 1: []}
        gens = b.generate([_request(), _request("what is it?")], stream=lambda i, d: got[i].append(d))
    assert ["".join(got[0]), "".join(got[1])] == [g.text for g in gens]
    assert gens[1].text.endswith("</answer>") and len(got[1]) > 1


def test_deltas_arrive_before_the_request_completes(scripted):
    """The server holds the rest of its answer until the caller has seen the first delta: a
    backend that passed text on only at the end would wait for ever (and fail at the deadline)."""
    seen = threading.Event()
    srv = scripted(
        [
            _chunk("<think>Zoom"),
            seen,
            _chunk(" in.</think>\n<answer>B</answer>", "stop", None),
            _chunk(usage={"prompt_tokens": 7, "completion_tokens": 3}),
            b"data: [DONE]\n\n",
        ]
    )
    with OpenAIBackend(srv.base_url, "m", max_retries=0, timeout_s=20) as b:
        deltas = []

        def on(i, d):
            deltas.append(d)
            seen.set()

        g = b.generate([_request()], stream=on)[0]
    assert deltas[0] == "<think>Zoom" and "".join(deltas) == g.text == "<think>Zoom in.</think>\n<answer>B</answer>"
    assert (g.finish_reason, g.stop, g.num_tokens, g.prompt_tokens) == ("stop", "</answer>", 3, 7)


def test_a_stripped_stop_string_comes_back_as_a_last_delta_and_nothing_after_a_stop_is_shown(scripted):
    # the server stripped "</code>" (stop_reason names it); another sent text past "</answer>"
    srv = scripted(
        [_chunk("<code>x</co"), _chunk("de"), _chunk("", "stop", "</code>"), b"data: [DONE]\n\n"],
    )
    with OpenAIBackend(srv.base_url, "m", max_retries=0) as b:
        deltas = []
        g = b.generate([_request()], stream=lambda i, d: deltas.append(d))[0]
    # "</co" + "de" is not a stop string: held back while it could be one, then shown
    assert deltas == ["<code>x", "</code</code>"] and g.text == "<code>x</code</code>" and g.stop == "</code>"
    srv2 = scripted([_chunk("<answer>B</ans"), _chunk("wer> and more"), _chunk(" text", "length"), b"data: [DONE]\n\n"])
    with OpenAIBackend(srv2.base_url, "m", max_retries=0) as b:
        deltas = []
        g = b.generate([_request()], stream=lambda i, d: deltas.append(d))[0]
    assert deltas == ["<answer>B", "</answer>"] and g.text == "<answer>B</answer>" and g.stop == "</answer>"


def test_a_stream_broken_after_a_delta_fails_cleanly_and_is_not_retried(scripted):
    srv = scripted([_chunk("<think>half"), "close"])
    with OpenAIBackend(srv.base_url, "m", max_retries=3, backoff_s=0.01) as b:
        deltas = []
        with pytest.raises(OpenAIServerError, match="broke after 11 characters") as e:
            b.generate([_request()], stream=lambda i, d: deltas.append(d))
    assert deltas == ["<think>half"] and srv.connections == 1 and b.stats["requests"] == 1
    assert "[DONE]" in str(e.value) and not e.value.retryable


def test_a_stream_broken_before_any_delta_is_retried(scripted):
    good = [_chunk("<answer>B</answer>", "stop", None), b"data: [DONE]\n\n"]
    srv = scripted([b": keep-alive\n\n", "close"], good)
    with OpenAIBackend(srv.base_url, "m", max_retries=2, backoff_s=0.01) as b:
        deltas = []
        g = b.generate([_request()], stream=lambda i, d: deltas.append(d))[0]
    assert srv.connections == 2 and b.stats["retries"] == 1
    assert "".join(deltas) == g.text == "<answer>B</answer>"


def test_an_error_event_and_a_malformed_chunk_fail_that_request(scripted):
    srv = scripted([_chunk("<think>"), b'data: {"error": {"message": "engine died", "code": 500}}\n\n'])
    with OpenAIBackend(srv.base_url, "m", max_retries=3, backoff_s=0.01) as b:
        with pytest.raises(OpenAIServerError, match="engine died"):
            b.generate([_request()], stream=lambda i, d: None)
    assert srv.connections == 1
    srv2 = scripted([b'data: {"choices": [{"delta": {"content": 5}}]}\n\n', b"data: [DONE]\n\n"])
    with OpenAIBackend(srv2.base_url, "m", max_retries=3, backoff_s=0.01) as b:
        with pytest.raises(OpenAIServerError, match="text is not a string"):
            b.generate([_request()], stream=lambda i, d: None)
    assert srv2.connections == 1


def test_what_the_callback_raises_ends_the_call():
    class Gone(Exception):
        pass

    def on(i, d):
        raise Gone

    with FakeUpstream() as up, OpenAIBackend(up.base_url, up.model, max_retries=0) as b:
        with pytest.raises(Gone):
            b.generate([_request()], stream=on)
        assert b.generate([_request()])[0].text == CODE  # the backend still works


def test_the_stream_fields_are_sent_only_with_a_callback():
    b = OpenAIBackend("http://127.0.0.1:9/v1", "m")
    _, plain = b.build_body(_request())
    _, streamed = b.build_body(_request(), stream=True)
    assert plain["stream"] is False and "stream_options" not in plain
    assert streamed["stream"] is True and streamed["stream_options"] == {"include_usage": True}
    assert {k: v for k, v in streamed.items() if k not in ("stream", "stream_options")} == {k: v for k, v in plain.items() if k != "stream"}
    assert b.capabilities.streaming


# --------------------------------------------------------------------------- thyme.http.fetch_events


def _events(srv, limits: HTTPLimits) -> list:
    got: list = []

    async def go():
        client = async_client(srv.base_url, limits)
        try:
            await fetch_events(client, "POST", srv.base_url + "/chat/completions", limits, got.append, content=b"{}")
        finally:
            await client.aclose()

    asyncio.run(go())
    return got


def test_fetch_events_parses_data_events_and_skips_the_rest(scripted):
    srv = scripted([b': comment\r\nevent: x\r\ndata: {"a": 1}\r\n\r\n', b"data: [1, 2]\n\ndata: [DONE]\n\n", b'data: {"late": 1}\n\n'])
    assert _events(srv, HTTPLimits(deadline_s=10)) == [{"a": 1}, [1, 2]]


def test_fetch_events_caps_the_body_and_one_line(scripted):
    flood = scripted([_chunk("x" * 500)] * 100 + ["hang"])
    with pytest.raises(ResponseTooLarge, match="cap of 4096 bytes"):
        _events(flood, HTTPLimits(deadline_s=10, max_response_bytes=4096))
    long_line = scripted([b"data: " + b"y" * 10000, "hang"])
    with pytest.raises(ResponseTooLarge, match="event-stream line over the cap of 2048"):
        _events(long_line, HTTPLimits(deadline_s=10, max_event_bytes=2048))


def test_fetch_events_has_one_deadline_for_the_whole_stream(scripted):
    trickle = scripted([_chunk("a"), "hang"])
    with pytest.raises(RequestTimeout, match="deadline of 0.5 s"):
        _events(trickle, HTTPLimits(deadline_s=0.5))


def test_fetch_events_refuses_malformed_events_and_a_stream_without_done(scripted):
    with pytest.raises(BadResponse, match="not usable JSON"):
        _events(scripted([b"data: {not json\n\n"]), HTTPLimits(deadline_s=10))
    with pytest.raises(BadResponse, match="not usable JSON"):
        _events(scripted([b"data: " + b"[" * 100 + b"]" * 100 + b"\n\n"]), HTTPLimits(deadline_s=10))
    with pytest.raises(ConnectFailed, match=r"before its \[DONE\]"):
        _events(scripted([_chunk("a"), "close"]), HTTPLimits(deadline_s=10))


# --------------------------------------------------------------------------- the dev server (tiny model)


@pytest.mark.slow
def test_streamed_equals_non_streamed_against_the_dev_server_chat_and_completions(tiny_checkpoint, tmp_path):
    """A real model behind the dev server (vLLM's semantics): an image request with a stop
    string kept in the text (chat), and a text request whose stop the server strips
    (completions), give the same Generation streamed or not, and the deltas make its text."""
    import numpy as np
    from PIL import Image

    from thyme.backends.hf import HFBackend
    from thyme.testing.openai_server import start_server

    img = tmp_path / "in.png"
    Image.fromarray((np.random.RandomState(1).rand(168, 224, 3) * 255).astype("uint8")).save(img)
    hf = HFBackend(str(tiny_checkpoint), dtype="float32")
    system = {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]}
    chat = GenerationRequest(
        [system, {"role": "user", "content": [{"type": "image", "image": str(img)}, {"type": "text", "text": "What?"}]}], max_new_tokens=16
    )
    text = GenerationRequest([system, {"role": "user", "content": [{"type": "text", "text": "Say something."}]}], max_new_tokens=16)
    (ref,) = hf.generate([chat])
    (tref,) = hf.generate([text])
    chat.stop, text.stop = [ref.text[4:9]], [tref.text[3:7]]
    with start_server(
        tiny_checkpoint, served_model_name="tiny", log_dir=tmp_path / "srv", startup_timeout_s=120, extra_args=["--threads", "1"]
    ) as s:
        for kw, req in (({}, chat), ({"continuation": "completions", "tokenizer": str(hf.model_id)}, text)):
            with OpenAIBackend(s.base_url, "tiny", timeout_s=60, **kw) as b:
                (whole,) = b.generate([req])
                deltas: list[str] = []
                (streamed,) = b.generate([req], stream=lambda i, d, out=deltas: out.append(d))
            assert streamed == whole and whole.stop == req.stop[0] and whole.num_tokens > 0 and whole.prompt_tokens > 0
            assert "".join(deltas) == whole.text and len(deltas) > 1
