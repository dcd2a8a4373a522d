"""The request's images are hostile: data URLs decoded within limits, local paths only under an
``--allow-path`` root, URLs never fetched unless ``--allow-url-fetch``; a limit over is a 400
naming it (``thyme.serve.inputs``)."""

from __future__ import annotations

import os

import httpx
import pytest

from thyme.serve import RequestError, ServeConfig
from thyme.serve.inputs import parse_request

from .conftest import data_url, png_bytes, running_server, user_message


def _parse(tmp_path, messages, **cfg):
    out = tmp_path / "req"
    out.mkdir(exist_ok=True)
    return parse_request({"messages": messages}, ServeConfig(**cfg), out)


def _refused(tmp_path, messages, **cfg) -> RequestError:
    with pytest.raises(RequestError) as e:
        _parse(tmp_path, messages, **cfg)
    assert e.value.status == 400
    return e.value


def test_a_data_url_becomes_a_checked_file_in_the_request_folder(tmp_path):
    p = _parse(tmp_path, user_message())
    assert p.question == "What is written on the sign?"
    assert len(p.images) == 1 and p.images[0].startswith(str(tmp_path / "req")) and p.images[0].endswith(".png")
    assert open(p.images[0], "rb").read() == png_bytes()


def test_a_path_under_an_allowed_root_is_read(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "a.png").write_bytes(png_bytes())
    p = _parse(tmp_path, user_message(url=str(root / "a.png")), allow_path=[str(root)])
    assert open(p.images[0], "rb").read() == png_bytes()
    p = _parse(tmp_path, user_message(url=f"file://{root / 'a.png'}"), allow_path=[str(root)])
    assert open(p.images[0], "rb").read() == png_bytes()


def test_a_path_outside_the_allowed_roots_is_refused(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    assert _refused(tmp_path, user_message(url=str(outside))).param == "allow_path"  # no root at all
    assert _refused(tmp_path, user_message(url=str(outside)), allow_path=[str(root)]).param == "allow_path"
    assert _refused(tmp_path, user_message(url=f"{root}/../secret.png"), allow_path=[str(root)]).param == "allow_path"
    os.symlink(outside, root / "link.png")  # a link inside the root to a file outside it
    assert _refused(tmp_path, user_message(url=str(root / "link.png")), allow_path=[str(root)]).param == "allow_path"
    sibling = tmp_path / "media-other"  # a prefix of the root's name is not under it
    sibling.mkdir()
    (sibling / "b.png").write_bytes(png_bytes())
    assert _refused(tmp_path, user_message(url=str(sibling / "b.png")), allow_path=[str(root)]).param == "allow_path"


def test_a_url_is_not_fetched_without_allow_url_fetch(tmp_path):
    e = _refused(tmp_path, user_message(url="http://127.0.0.1:9/a.png"))
    assert e.param == "allow_url_fetch" and "allow_url_fetch" in e.message


@pytest.mark.parametrize(
    "messages, cfg, limit",
    [
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url()}}] * 3 + [{"type": "text", "text": "q"}]}],
            {"max_images": 2},
            "max_images",
        ),
        (user_message(), {"max_image_bytes": 100}, "max_image_bytes"),
        (user_message(url=data_url(png_bytes((200, 200)))), {"max_image_pixels": 10_000}, "max_image_pixels"),
        (user_message(question="x" * 50), {"max_question_chars": 10}, "max_question_chars"),
    ],
)
def test_a_limit_over_is_refused_naming_it(tmp_path, messages, cfg, limit):
    e = _refused(tmp_path, messages, **cfg)
    assert e.param == limit and limit in e.message


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "system", "content": "hi"}],
        [{"role": "user", "content": "no image here"}],
        user_message(url="data:image/png;base64,@@@not-base64@@@"),
        user_message(url="data:image/png;base64," + "QUJD" * 10),  # base64 of text, not an image
        user_message(url="ftp://host/a.png"),
        user_message(question=""),
    ],
)
def test_malformed_messages_are_refused(tmp_path, messages):
    _refused(tmp_path, messages)


def test_the_server_answers_400_naming_the_rule(scripted, sandbox, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    root = tmp_path / "media"
    root.mkdir()
    with running_server(scripted, sandbox, allow_path=[str(root)], max_image_pixels=10_000) as srv:
        cases = {
            "allow_path": user_message(url=str(outside)),
            "allow_url_fetch": user_message(url="https://example.com/a.png"),
            "max_image_pixels": user_message(url=data_url(png_bytes((200, 200)))),
        }
        for param, messages in cases.items():
            r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "thyme-test", "messages": messages}, timeout=30)
            assert r.status_code == 400, (param, r.text)
            assert r.json()["error"]["param"] == param
        r = httpx.post(srv.url + "/v1/chat/completions", content=b"{not json", timeout=30)
        assert r.status_code == 400
        assert srv.service.admitted == 0  # a refused request holds no session
    assert not scripted.requests  # nothing reached the model


@pytest.fixture
def media_server(tmp_path):
    """A loopback HTTP server serving one PNG at /a.png (and a 404 elsewhere)."""
    import http.server
    import threading

    raw = png_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/a.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_a_url_is_fetched_only_when_allowed_and_private_hosts_need_their_own_switch(tmp_path, media_server, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "*")
    url = media_server + "/a.png"
    assert _refused(tmp_path, user_message(url=url)).param == "allow_url_fetch"
    assert _refused(tmp_path, user_message(url=url), allow_url_fetch=True).param == "allow_private_urls"  # loopback: not public
    p = _parse(tmp_path, user_message(url=url), allow_url_fetch=True, allow_private_urls=True)
    assert open(p.images[0], "rb").read() == png_bytes()
    assert "HTTP 404" in _refused(tmp_path, user_message(url=media_server + "/nope"), allow_url_fetch=True, allow_private_urls=True).message
    e = _refused(tmp_path, user_message(url=url), allow_url_fetch=True, allow_private_urls=True, max_image_bytes=50)
    assert e.param == "max_image_bytes"
