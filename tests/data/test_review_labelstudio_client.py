"""The Label Studio client (:mod:`thyme.data.labelstudio`) against a hostile or broken loopback
server: errors name the call and never escape as tracebacks; token kinds; import batching.
(The real server: ``test_review_labelstudio.py``.)"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from thyme.data.labelstudio import LabelStudio, LabelStudioError, LabelStudioLimits


class _Server:
    """A loopback server answering each request with ``route(method, path, headers, body) -> (status, bytes)``."""

    def __init__(self, route):
        self.requests: list[tuple[str, str, dict, bytes]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def _do(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                outer.requests.append((self.command, self.path, dict(self.headers), body))
                status, data = route(self.command, self.path, self.headers, body)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _do

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    made = []

    def start(route):
        s = _Server(route)
        made.append(s)
        return s

    yield start
    for s in made:
        s.close()


def test_import_is_batched_by_count_and_bytes(serve):
    s = serve(lambda m, p, h, b: (201, json.dumps({"task_count": len(json.loads(b))}).encode()))
    tasks = [{"data": {"x": "y" * 1000, "i": i}} for i in range(5)]
    assert LabelStudio(s.url, "t" * 40, limits=LabelStudioLimits(import_batch=2)).import_tasks(3, tasks) == 5
    bodies = [json.loads(r[3]) for r in s.requests]
    assert [len(b) for b in bodies] == [2, 2, 1] and [t["data"]["i"] for b in bodies for t in b] == [0, 1, 2, 3, 4]
    assert all(r[1] == "/api/projects/3/import" and r[2]["Authorization"] == "Token " + "t" * 40 for r in s.requests)
    s.requests.clear()
    assert LabelStudio(s.url, "t" * 40, limits=LabelStudioLimits(import_batch_bytes=2500)).import_tasks(3, tasks) == 5
    assert [len(json.loads(r[3])) for r in s.requests] == [2, 2, 1]
    with pytest.raises(LabelStudioError, match="local-files"):
        LabelStudio(s.url, "t" * 40, limits=LabelStudioLimits(import_batch_bytes=500)).import_tasks(3, tasks)


def test_error_statuses_and_bad_replies_are_clear_errors(serve):
    replies = {
        "/api/projects": (401, b'{"detail": "legacy token authentication has been disabled"}'),
        "/api/tasks/1/annotations": (200, b"not json"),
        "/api/projects/1/export?exportType=JSON": (500, b"boom"),
        "/api/tasks?project=1&page=1&page_size=100": (200, b"[" * 10_000),
    }
    s = serve(lambda m, p, h, b: replies.get(p, (404, b"{}")))
    ls = LabelStudio(s.url, "a" * 40)
    with pytest.raises(LabelStudioError, match="HTTP 401") as e:
        ls.create_project("abc", "<View/>")
    assert e.value.status == 401 and "legacy tokens" in e.value.hint
    with pytest.raises(LabelStudioError, match="not usable JSON"):
        ls.create_annotation(1, [])
    with pytest.raises(LabelStudioError, match="HTTP 500"):
        ls.export_project(1)
    with pytest.raises(LabelStudioError, match="not usable JSON"):
        ls.list_tasks(1)


def test_an_oversized_reply_and_no_server(serve):
    s = serve(lambda m, p, h, b: (200, b"[" + b" " * 5000 + b"]"))
    with pytest.raises(LabelStudioError, match="cap"):
        LabelStudio(s.url, "a" * 40, limits=LabelStudioLimits(max_response_bytes=1000)).export_project(1)
    port = s.httpd.server_address[1]
    s.close()
    with pytest.raises(LabelStudioError, match="cannot reach|Label Studio running"):
        LabelStudio(f"http://127.0.0.1:{port}", "a" * 40, limits=LabelStudioLimits(deadline_s=5)).create_project("abc", "<View/>")
    assert not LabelStudio(f"http://127.0.0.1:{port}", "x").health()
    with pytest.raises(LabelStudioError, match="http"):
        LabelStudio("file:///etc/passwd", "x")


def test_personal_access_token_is_exchanged_and_refreshed_once_on_401(serve):
    state = {"access": 0, "expired": True}

    def route(m, p, h, b):
        if p == "/api/token/refresh/":
            assert json.loads(b) == {"refresh": "aaa.bbb.ccc"} and "Authorization" not in h
            state["access"] += 1
            return 200, json.dumps({"access": f"acc{state['access']}"}).encode()
        if h.get("Authorization") == "Bearer acc1" and state["expired"]:
            state["expired"] = False
            return 401, b'{"detail": "expired"}'
        return 201, json.dumps({"id": 7, "auth": h.get("Authorization")}).encode()

    s = serve(route)
    ls = LabelStudio(s.url, "aaa.bbb.ccc")
    assert ls.uses_personal_token
    assert ls.create_project("abc", "<View/>")["auth"] == "Bearer acc2"  # acc1 expired: refreshed once
    assert ls.create_project("abd", "<View/>")["auth"] == "Bearer acc2"  # kept
    assert state["access"] == 2


def test_a_reply_without_an_integer_id_is_refused(serve):
    s = serve(lambda m, p, h, b: (201, b'{"id": "7"}'))
    with pytest.raises(LabelStudioError, match="integer 'id'"):
        LabelStudio(s.url, "t" * 40).create_project("abc", "<View/>")


def test_result_builders_and_download_paths(serve):
    from thyme.data.labelstudio import choices_result, rectangle_result, text_result

    r = rectangle_result("box", "image", (100, 50, 300, 150), (1000, 500), "target")
    assert r["value"] == {"x": 10.0, "y": 10.0, "width": 20.0, "height": 20.0, "rotation": 0, "rectanglelabels": ["target"]}
    assert (r["type"], r["original_width"], r["original_height"]) == ("rectanglelabels", 1000, 500)
    assert choices_result("decision", "question", "accept")["value"] == {"choices": ["accept"]}
    assert text_result("note", "question", "hi")["value"] == {"text": ["hi"]}
    s = serve(lambda m, p, h, b: (200, b"\x89PNG bytes"))
    ls = LabelStudio(s.url, "t" * 40)
    assert ls.download("/data/local-files/?d=a%20b.png") == b"\x89PNG bytes"
    assert s.requests[-1][1] == "/data/local-files/?d=a%20b.png"
    for bad in ("http://elsewhere/x", "//elsewhere/x", "relative", None):
        with pytest.raises(LabelStudioError, match="not a path"):
            ls.download(bad)
