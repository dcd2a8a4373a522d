"""``thyme eval --base-url`` / ``thyme run --base-url`` check the server once before the run
(issue 18, defect 6): a server that is down, a mistyped URL, a key it refuses or a model name it
does not serve stop with one clear error (exit 2) naming the URL and what was wrong, instead of
every question spending its retries and ``metrics.json`` reading 0.0."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from thyme.cli import main as thyme_main

from ..evaluate.test_benchmark_data import hrbench_tsv


class ModelServer:
    """An OpenAI-compatible stub on 127.0.0.1: ``GET /v1/models`` lists ``served`` (or answers
    ``status``); every request is recorded; a chat request gets HTTP 500 (it must never come)."""

    def __init__(self, served=("tiny",), status=200):
        self.requests: list[tuple[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                outer.requests.append(("GET", self.path))
                if self.path == "/v1/models" and status == 200:
                    self._reply(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in served]})
                else:
                    self._reply(status if status != 200 else 404, {"error": "no"})

            def do_POST(self):  # noqa: N802
                outer.requests.append(("POST", self.path))
                self._reply(500, {"error": "not expected"})

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stub(request):
    s = ModelServer(**getattr(request, "param", {}))
    yield s
    s.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once closed


def _eval(tmp_path, base_url, model="tiny"):
    tsv = hrbench_tsv(tmp_path / "hr.tsv")
    return ["eval", "--benchmark", "hrbench4k", "--data", str(tsv), "--out", str(tmp_path / "o"), "--base-url", base_url, "--model", model]


def _run(tmp_path, base_url, model="tiny"):
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "red").save(img)
    return [
        "run",
        "--image",
        str(img),
        "--question",
        "q",
        "--base-url",
        base_url,
        "--model",
        model,
        "--out",
        str(tmp_path / "o" / "t.json"),
    ]


@pytest.mark.parametrize("argv", [_eval, _run])
def test_a_server_that_is_down_is_one_clear_error(argv, tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    rc = thyme_main(argv(tmp_path, url))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"the model server at {url} cannot be reached" in err and "--base-url" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # the folder this failed run created is gone (defect 8)


@pytest.mark.parametrize("argv", [_eval, _run])
def test_a_model_name_the_server_does_not_serve_is_one_clear_error(argv, stub, tmp_path, capsys):
    rc = thyme_main(argv(tmp_path, stub.base_url, model="tinny"))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"{stub.base_url} does not serve model 'tinny'; it serves ['tiny']" in err and "--model" in err
    assert not any(m == "POST" for m, _ in stub.requests)  # no question was sent
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stub", [{"status": 401}], indirect=True)
def test_a_refused_key_is_one_clear_error(stub, tmp_path, capsys):
    rc = thyme_main(_eval(tmp_path, stub.base_url))
    err = capsys.readouterr().err
    assert rc == 2 and "refused the API key (HTTP 401" in err and "--api-key" in err
    assert not any(m == "POST" for m, _ in stub.requests)


@pytest.mark.parametrize("stub", [{"status": 404}], indirect=True)
def test_a_server_that_lists_no_models_is_asked_the_questions(stub, tmp_path, capsys):
    thyme_main(_eval(tmp_path, stub.base_url) + ["--limit", "1", "--max-retries", "0", "--allow-failures"])
    assert ("POST", "/v1/chat/completions") in stub.requests  # the check let it through
