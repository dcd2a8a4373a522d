"""Hostile requests to ``thyme serve`` (threat model: a server faces any client): a
decompression-bomb image, a body nested too deep, a body larger than the server reads. Each is
refused with a clear 4xx before any pixel is decoded or the model is asked, and the server goes
on answering."""

from __future__ import annotations

import httpx

from ..conftest import png_1bit
from .conftest import data_url, running_server, user_message


def _chat(url, **kw):
    return httpx.post(url + "/v1/chat/completions", timeout=60, **kw)


def test_a_bomb_image_is_refused_from_its_header(scripted, sandbox, no_decode):
    bomb = png_1bit(30000, 30000)  # 900 Mpx from ~110 KB
    assert len(bomb) < 200_000
    with running_server(scripted, sandbox) as srv:
        r = _chat(srv.url, json={"messages": user_message(url=data_url(bomb))})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "image_budget" and "30000x30000" in err["message"]
        assert (30000, 30000) not in no_decode
        assert _chat(srv.url, json={"messages": user_message()}).json()["choices"][0]["message"]["content"] == "B"
    assert len(scripted.requests) == 2  # only the good request reached the model (two rounds)


def test_a_body_nested_too_deep_is_a_400(scripted, sandbox):
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with running_server(scripted, sandbox) as srv:
        r = _chat(srv.url, content=deep, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    assert not scripted.requests


def test_a_body_larger_than_the_server_reads_is_a_413(scripted, sandbox):
    with running_server(scripted, sandbox, max_images=1, max_image_bytes=1000, max_question_chars=10) as srv:
        big = b'{"x": "' + b"a" * (3 << 20) + b'"}'
        r = _chat(srv.url, content=big)  # with a Content-Length
        assert r.status_code == 413

        def chunks():  # no Content-Length: the server counts as it reads
            for _ in range(48):
                yield b"a" * (64 << 10)

        r = _chat(srv.url, content=chunks())
        assert r.status_code == 413
        assert srv.service.admitted == 0
    assert not scripted.requests
