"""Ctrl-C during ``thyme eval --base-url`` (the independent schedule, requests in flight on a slow
server) stops at once with exit 130, the predictions written so far kept, and a second Ctrl-C
prints no traceback (issue 18, defect 3)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ..conftest import REPO
from ..evaluate.test_benchmark_data import hrbench_tsv

ENV = dict(os.environ, PYTHONPATH=str(REPO / "src"))


class SlowServer:
    """Lists model ``m``; the first chat request is answered at once, every later one only
    after ``release`` is set (60 s at most): the requests a Ctrl-C finds in flight."""

    def __init__(self):
        self.posts = 0
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, body):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:  # the client is gone (interrupted)
                    pass

            def do_GET(self):  # noqa: N802
                self._reply({"object": "list", "data": [{"id": "m", "object": "model"}]})

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.posts += 1
                if outer.posts > 1:
                    outer.release.wait(60)
                msg = {"role": "assistant", "content": "<answer>A</answer>"}
                self._reply(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "model": "m",
                        "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                )

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def slow():
    s = SlowServer()
    yield s
    s.close()


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_eval_base_url_at_once_and_keeps_results(presses, slow, tmp_path):
    out = tmp_path / "o"
    argv = [sys.executable, "-m", "thyme.cli", "eval", "--benchmark", "hrbench4k", "--data", str(hrbench_tsv(tmp_path / "hr.tsv"))]
    argv += ["--out", str(out), "--base-url", slow.base_url, "--model", "m", "--concurrency", "2", "--no-report"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    pred = out / "predictions.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (pred.exists() and pred.read_text().count("\n") >= 1 and slow.posts >= 2):
        time.sleep(0.05)
    assert slow.posts >= 2, "the second question never reached the server"
    time.sleep(0.5)  # the second request is in flight, held by the server
    for _ in range(presses):
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.3)
    try:
        _, err = proc.communicate(timeout=20)  # not the 60 s the server holds the request
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    keys = [json.loads(l)["key"] for l in pred.read_text().splitlines() if l.strip()]
    assert len(keys) == 1  # the answered question is kept; those in flight are redone on resume
