"""The request's ``model`` must be the served name (404 ``model_not_found`` otherwise; left out:
accepted), and ``usage`` counts the model's tokens, prompt and completion, over every round as
the backend reported them."""

from __future__ import annotations

import httpx
import pytest

from thyme.backends.base import Backend

from .conftest import running_server, user_message


class Reporting(Backend):
    """The scripted backend, reporting a prompt of ``100 + 10 * round`` tokens per call (as an
    upstream's ``usage.prompt_tokens`` or the hf backend's encoded prompt would)."""

    name = "reporting"

    def __init__(self, inner):
        self.inner, self.capabilities, self.calls = inner, inner.capabilities, 0

    def generate(self, requests, stream=None):
        gens = self.inner.generate(requests, stream=stream)
        for g in gens:
            g.prompt_tokens = 100 + 10 * self.calls
            self.calls += 1
        return gens


def _post(url, **body):
    return httpx.post(url + "/v1/chat/completions", json={"messages": user_message(), **body}, timeout=60)


def test_usage_counts_prompt_and_completion_tokens_of_every_round(scripted, sandbox):
    backend = Reporting(scripted)
    with running_server(backend, sandbox) as srv:
        r = _post(srv.url, model="thyme-test")
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json={"messages": user_message(), "stream": True}, timeout=60) as s:
            last = [line for line in s.iter_lines() if line.startswith("data: {")][-1]
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["thyme"]["rounds"]) == 2 and backend.calls == 4
    completion = sum(x["num_tokens"] for x in body["thyme"]["rounds"])
    assert completion > 0
    assert body["usage"] == {"prompt_tokens": 100 + 110, "completion_tokens": completion, "total_tokens": 210 + completion}
    import json

    streamed = json.loads(last[len("data: ") :])["usage"]
    assert streamed == {"prompt_tokens": 120 + 130, "completion_tokens": completion, "total_tokens": 250 + completion}


def test_usage_without_prompt_counts_reports_zero_prompt_tokens(scripted, sandbox):
    with running_server(scripted, sandbox) as srv:
        r = _post(srv.url)
    u = r.json()["usage"]
    assert u["prompt_tokens"] == 0 and u["completion_tokens"] == u["total_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True])
def test_another_model_name_gets_404_model_not_found(stream, scripted, sandbox):
    with running_server(scripted, sandbox) as srv:
        r = _post(srv.url, model="gpt-4o", stream=stream)
        wrong_type = _post(srv.url, model=["thyme-test"])
        assert srv.service.admitted == 0
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error" and err["param"] == "model"  # as OpenAI answers
    assert "'gpt-4o'" in err["message"] and "'thyme-test'" in err["message"]
    assert wrong_type.status_code == 400 and wrong_type.json()["error"]["param"] == "model"
    assert scripted.requests == []  # nothing reached the model


def test_the_openai_sdk_reads_another_model_name_as_not_found(scripted, sandbox):
    from openai import NotFoundError, OpenAI

    with running_server(scripted, sandbox) as srv:
        client = OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(NotFoundError) as e:
            client.chat.completions.create(model="gpt-4o", messages=user_message())
    assert e.value.code == "model_not_found" and "thyme-test" in e.value.message


def test_the_served_name_or_no_model_is_accepted(scripted, sandbox):
    with running_server(scripted, sandbox) as srv:
        named = _post(srv.url, model="thyme-test")
        unnamed = _post(srv.url)
    assert named.status_code == 200 and named.json()["choices"][0]["message"]["content"] == "B"
    assert named.json()["model"] == "thyme-test"
    assert unnamed.status_code == 200 and unnamed.json()["choices"][0]["message"]["content"] == "B"


def test_usage_through_the_openai_backend_sums_what_the_upstream_reported(sandbox):
    """The openai backend against a real HTTP upstream (``FakeUpstream``): ``usage`` is the sum,
    over the trajectory's calls, of the ``usage`` each answer carried."""
    from thyme.backends.openai import OpenAIBackend
    from thyme.testing.fake_upstream import FakeUpstream

    with FakeUpstream() as up, OpenAIBackend(up.base_url, up.model, max_retries=0) as backend:
        with running_server(backend, sandbox) as srv:
            r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": user_message("[code] what is it?")}, timeout=60)
        reported = up.stats["usage"]
    assert r.status_code == 200, r.text
    assert len(r.json()["thyme"]["rounds"]) == 2 and len(reported) == 2
    prompt = sum(u["prompt_tokens"] for u in reported)
    completion = sum(u["completion_tokens"] for u in reported)
    assert prompt > completion > 0
    assert r.json()["usage"] == {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
