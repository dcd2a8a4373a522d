"""``thyme serve --model TINY`` (the hf backend, a tiny random checkpoint) in its own process
answers a plain and a streamed request with an image from the ``openai`` SDK, stops cleanly on
SIGTERM and leaves no request folder behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import user_message


@pytest.fixture(scope="module")
def tiny_server(tiny_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    port_file = d / "port"
    tmp = d / "tmp"  # the server's own temporary folder: nothing of a request may stay in it
    tmp.mkdir()
    log = open(d / "log", "w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "thyme.cli",
            "serve",
            "--model",
            str(tiny_checkpoint),
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--served-model-name",
            "tiny",
            "--max-new-tokens",
            "12",
            "--max-rounds",
            "2",
            "--max-pixels",
            "12544",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "THYME_SERVE_API_KEY": "", "TMPDIR": str(tmp)},
    )
    try:
        deadline = time.monotonic() + 240
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"thyme serve did not start:\n{log.read()[-3000:]}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port_file.read_text().strip()}/v1"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(60) == 0, "thyme serve did not stop cleanly on SIGTERM"
            assert not list(tmp.glob("thyme-serve-*")), "a request's folder was left behind"
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()


def _client(url):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key="none", max_retries=0, timeout=180)


@pytest.mark.slow
def test_a_tiny_checkpoint_answers_a_plain_request(tiny_server):
    r = _client(tiny_server).chat.completions.create(model="tiny", messages=user_message())
    thyme = r.model_extra["thyme"]
    assert thyme["stop_reason"] not in (None, "error"), thyme["error"]
    assert thyme["rounds"] and thyme["limits"]["max_new_tokens"] == 12
    assert r.model == "tiny"
    assert r.usage.completion_tokens == sum(x["num_tokens"] for x in thyme["rounds"]) > 0
    assert r.usage.prompt_tokens > r.usage.completion_tokens  # the hf backend counts each round's encoded prompt (image included)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].message.content == (thyme["answer"] or "")


@pytest.mark.slow
def test_a_tiny_checkpoint_streams(tiny_server):
    chunks = list(_client(tiny_server).chat.completions.create(model="tiny", messages=user_message(), stream=True))
    events = [c.model_extra["thyme"] for c in chunks if (c.model_extra or {}).get("thyme")]
    assert events and events[-1]["event"] == "done" and events[-1]["stop_reason"] != "error"
    streamed = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices)
    assert streamed == "".join(r["text"] for r in events[-1]["rounds"])  # the deltas are the model's text
    assert chunks[-1].usage.completion_tokens > 0
