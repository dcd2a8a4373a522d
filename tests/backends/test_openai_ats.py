"""ATS over an OpenAI-compatible vLLM server (issue 17): the request switch and the pre-run check.

The processor itself runs on a real vLLM in tests/rollout/test_vllm_colocate_real.py and over
HTTP in tests/backends/test_openai_against_vllm.py; here: what the backend sends, and that a
server which ignores the switch is refused before the run instead of sampling code silently.
"""

from __future__ import annotations

import json

import pytest

from thyme.backends.base import GenerationRequest
from thyme.backends.openai import OpenAIBackend
from thyme.errors import ThymeError
from thyme.http import Response


def _request(ats=True, temperature=1.0):
    return GenerationRequest(
        messages=[{"role": "user", "content": [{"type": "text", "text": "q"}]}],
        assistant_parts=[],
        max_new_tokens=8,
        stop=["</code>"],
        temperature=temperature,
        ats=ats,
    )


@pytest.mark.parametrize("continuation", ["vllm", "completions"])
def test_ats_requests_carry_the_vllm_switch_and_the_backend_declares_ats(continuation):
    be = OpenAIBackend("http://127.0.0.1:9/v1", "m", continuation=continuation)
    assert be.capabilities.ats
    if continuation == "vllm":
        _, body = be.build_body(_request())
        assert body["vllm_xargs"] == {"thyme_ats": 1}
        _, body = be.build_body(_request(temperature=0.0))  # greedy anyway: no switch
        assert "vllm_xargs" not in body
        _, body = be.build_body(_request(ats=False))
        assert "vllm_xargs" not in body


def test_other_servers_do_not_claim_ats():
    be = OpenAIBackend("http://127.0.0.1:9/v1", "m", continuation="sglang")
    assert not be.capabilities.ats
    _, body = be.build_body(_request())
    assert "vllm_xargs" not in body


def _probe_answer(text):
    """A chat completion answering ``text``."""
    return {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


@pytest.fixture
def probe(monkeypatch):
    sent = []
    answer = {}

    def fake_fetch_sync(method, url, limits, *, content=None, json_body=None, headers=None):
        sent.append((method, url, json_body))
        if url.endswith("/models"):
            return Response(url, 200, {}, json.dumps({"data": [{"id": "m"}]}).encode())
        return Response(url, answer.get("status", 200), {}, json.dumps(answer["body"]).encode())

    import thyme.backends.openai as mod

    monkeypatch.setattr(mod, "fetch_sync", fake_fetch_sync)
    return sent, answer


def test_the_ats_check_passes_on_the_processors_reply(probe):
    sent, answer = probe
    answer["body"] = _probe_answer("thyme-ats-ok")
    OpenAIBackend("http://127.0.0.1:9/v1", "m").check_server(ats=True)
    body = sent[-1][2]
    assert sent[-1][1].endswith("/chat/completions")
    assert body["vllm_xargs"] == {"thyme_ats": 1, "thyme_ats_probe": 1} and body["temperature"] <= 2


@pytest.mark.parametrize("text", ["thyme-ats", "x = 1", "", None])
def test_a_server_that_ignores_the_switch_is_refused_before_the_run(probe, text):
    _, answer = probe
    answer["body"] = _probe_answer(text)
    with pytest.raises(ThymeError, match="ignores --ats") as e:
        OpenAIBackend("http://127.0.0.1:9/v1", "m").check_server(ats=True)
    assert "--logits-processors thyme.backends.vllm_ats:GreedyInsideCodeLogitsProcessor" in e.value.hint


def test_the_ats_check_names_http_errors_and_can_be_switched_off(probe):
    sent, answer = probe
    answer.update(status=400, body={"error": {"message": "bad request"}})
    with pytest.raises(ThymeError, match="HTTP 400"):
        OpenAIBackend("http://127.0.0.1:9/v1", "m").check_server(ats=True)
    answer.update(status=200, body={"choices": []})
    with pytest.raises(ThymeError, match="ignores --ats"):
        OpenAIBackend("http://127.0.0.1:9/v1", "m").check_server(ats=True)
    n = len(sent)
    OpenAIBackend("http://127.0.0.1:9/v1", "m", ats_check=False).check_server(ats=True)
    assert [u for _, u, _ in sent[n:]] == ["http://127.0.0.1:9/v1/models"]  # the listing only
