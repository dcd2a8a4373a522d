"""``thyme serve --model TINY`` (the hf backend, a tiny random checkpoint) in its own process
answers a plain and a streamed request with an image from the ``openai`` SDK, stops cleanly on
SIGTERM and leaves no request folder behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import user_message


@pytest.fixture(scope="module")
def tiny_server(tiny_checkpoint, tmp_path_factory):
    from thyme.testing.serve_load import ServeProcess

    args = ["--model", str(tiny_checkpoint), "--served-model-name", "tiny", "--max-new-tokens", "12", "--max-rounds", "2"]
    sp = ServeProcess([*args, "--max-pixels", "12544"])
    try:
        yield f"{sp.url}/v1"
    finally:
        # its own temporary folder: nothing of a request may stay in it
        assert sp.stop() == 0, "thyme serve did not stop cleanly on SIGTERM"
        assert not list(Path(sp.tmpdir).glob("thyme-serve-*")), "a request's folder was left behind"


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
