"""Ctrl-C (SIGINT) and SIGTERM, sent to a real server process, drain the requests in flight, then
stop: no new connection is taken, the request running when the signal came is answered, the
service is closed, and the process ends (SIGTERM: status 0; SIGINT: ``KeyboardInterrupt`` after the
drain, which ``thyme``'s command line turns into status 130). ``thyme.serve.server.run_app``
with uvicorn's own signal capture; in-process ``should_exit`` is in ``test_sessions.py``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import ANSWER, user_message

#: The server process: the scripted backend held at a gate (a file the test creates), the real
#: sandbox, ``thyme.serve.server.serve`` in the main thread (as ``thyme serve`` runs it).
CHILD = """
import sys, time
from pathlib import Path

from thyme.agent import AgentConfig
from thyme.backends.processors import load_processor
from thyme.sandbox import Sandbox
from thyme.serve import ServeConfig, Service
from thyme.serve.server import serve
from thyme.testing.scripted import ScriptedBackend

ckpt, d, answer = sys.argv[1], Path(sys.argv[2]), sys.argv[3]


class Gated(ScriptedBackend):
    def generate(self, requests, stream=None):
        (d / "waiting").touch()
        deadline = time.monotonic() + 60
        while not (d / "open").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the test never opened the gate")
            time.sleep(0.02)
        return super().generate(requests, stream=stream)


status = 0
with Sandbox() as sandbox:
    cfg = ServeConfig(port=0)
    service = Service(Gated(load_processor(ckpt, max_pixels=12544).tokenizer, [answer]), sandbox, AgentConfig(max_new_tokens=400), cfg, model_name="m", local=False)
    try:
        serve(service, cfg, key=None, port_file=str(d / "port"))
    except KeyboardInterrupt:
        status = 130
    finally:
        service.close()
(d / "closed").write_text(str(status))
sys.exit(status)
"""


def _until(cond, what, proc, log):
    deadline = time.monotonic() + 120
    while not cond():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 0)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_drains_the_request_in_flight_then_stops(sig, status, tiny_checkpoint, tmp_path):
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tiny_checkpoint), str(tmp_path), ANSWER],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
    try:
        _until(lambda: (tmp_path / "port").exists(), "the server did not start", proc, log)
        url = f"http://127.0.0.1:{(tmp_path / 'port').read_text().strip()}/v1/chat/completions"
        with ThreadPoolExecutor(1) as ex:
            inflight = ex.submit(httpx.post, url, json={"model": "m", "messages": user_message()}, timeout=120)
            _until(lambda: (tmp_path / "waiting").exists(), "the request never reached the model", proc, log)
            proc.send_signal(sig)
            time.sleep(1.0)
            assert proc.poll() is None, f"the server stopped with a request in flight:\n{log.read_text()[-3000:]}"
            with pytest.raises(httpx.TransportError):  # draining: no new connection is taken
                httpx.post(url, json={"model": "m", "messages": user_message()}, timeout=10)
            (tmp_path / "open").touch()
            r = inflight.result()
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "B"
        assert proc.wait(60) == status, log.read_text()[-3000:]
        assert (tmp_path / "closed").read_text() == str(status)  # the service was closed after the drain
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
