"""``POST /v1/chat/completions`` runs the whole Thyme loop, from the ``openai`` Python SDK against
a real uvicorn server: the scripted model crops the image in the sandbox, then answers."""

from __future__ import annotations

import json

import pytest

from .conftest import QUESTION, running_server, user_message


def _client(url, key="none"):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_a_plain_request_gets_the_answer_and_the_trajectory(scripted, sandbox):
    with running_server(scripted, sandbox) as srv:
        r = _client(srv.url).chat.completions.create(model="thyme-test", messages=user_message())
    assert r.choices[0].message.content == "B"
    assert r.choices[0].finish_reason == "stop"
    thyme = r.model_extra["thyme"]
    assert thyme["stop_reason"] == "answer" and thyme["answer"] == "B"
    first = thyme["rounds"][0]
    assert "img.crop((0, 0, 32, 24))" in first["code"]
    assert first["ok"] is True and "crop.png" in first["output"]
    assert len(first["images"]) == 1 and first["images"][0].startswith("data:image/png;base64,")
    assert r.usage.completion_tokens == sum(x["num_tokens"] for x in thyme["rounds"]) > 0
    # the question reached the model in the released prompt
    assert any(QUESTION in json.dumps(req.messages) for req in scripted.requests)


def test_content_full_gives_the_whole_response_text(scripted, sandbox):
    with running_server(scripted, sandbox, content="full") as srv:
        r = _client(srv.url).chat.completions.create(model="thyme-test", messages=user_message())
    text = r.choices[0].message.content
    assert "<code>" in text and "<sandbox_output>" in text and text.rstrip().endswith("<answer>B</answer>")


def test_a_streamed_request_sends_text_deltas_sandbox_events_and_the_answer(scripted, sandbox):
    with running_server(scripted, sandbox) as srv:
        chunks = list(_client(srv.url).chat.completions.create(model="thyme-test", messages=user_message(), stream=True))
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "img.crop" in reasoning and "The sign reads STOP" in reasoning
    assert content == "B"
    events = [c.model_extra["thyme"] for c in chunks if (c.model_extra or {}).get("thyme")]
    outputs = [e for e in events if e["event"] == "sandbox_output"]
    assert len(outputs) == 1 and outputs[0]["images"][0].startswith("data:image/png;base64,")
    assert events[-1]["event"] == "done" and events[-1]["stop_reason"] == "answer"
    assert events[-1]["rounds"][0]["images"] == outputs[0]["images"]  # the last chunk's trajectory keeps the sandbox image
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_health_and_models(scripted, sandbox):
    import httpx

    with running_server(scripted, sandbox) as srv:
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"
        assert [m.id for m in _client(srv.url).models.list().data] == ["thyme-test"]


@pytest.mark.parametrize("asked, applied", [(None, 5), (2, 2), (99, 5)])
def test_a_request_s_rounds_clamp_to_the_server_s(asked, applied, scripted, sandbox):
    from thyme.agent import AgentConfig

    extra = {} if asked is None else {"max_rounds": asked}
    with running_server(scripted, sandbox, agent=AgentConfig(max_rounds=5, max_new_tokens=400)) as srv:
        r = _client(srv.url).chat.completions.create(model="thyme-test", messages=user_message(), extra_body=extra)
    assert r.model_extra["thyme"]["limits"]["max_rounds"] == applied


@pytest.mark.parametrize("asked, applied", [(None, 300), (120, 120), (100000, 300)])
def test_a_request_s_max_tokens_clamp_to_the_server_s(asked, applied, scripted, sandbox):
    from thyme.agent import AgentConfig

    extra = {} if asked is None else {"max_tokens": asked}
    with running_server(scripted, sandbox, agent=AgentConfig(max_new_tokens=200, max_total_tokens=300)) as srv:
        r = _client(srv.url).chat.completions.create(model="thyme-test", messages=user_message(), **extra)
    limits = r.model_extra["thyme"]["limits"]
    assert limits["max_total_tokens"] == applied and limits["max_new_tokens"] == min(200, applied)
    assert all(req.max_new_tokens <= applied for req in scripted.requests)


@pytest.mark.parametrize("body", [{"max_tokens": 0}, {"max_tokens": "5"}, {"temperature": -1}, {"top_p": 2}, {"seed": 1.5}, {"n": 2}])
def test_a_bad_sampling_value_is_a_400_naming_it(body, scripted, sandbox):
    import httpx

    with running_server(scripted, sandbox) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": user_message(), **body}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(body))


def test_content_full_streams_the_whole_text_as_content(scripted, sandbox):
    with running_server(scripted, sandbox, content="full") as srv:
        chunks = list(_client(srv.url).chat.completions.create(model="thyme-test", messages=user_message(), stream=True))
        plain = _client(srv.url).chat.completions.create(model="thyme-test", messages=user_message())
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "<sandbox_output>" in streamed and streamed.rstrip().endswith("<answer>B</answer>")
    assert streamed == plain.choices[0].message.content.replace("<image>", "")  # the same text, images left to the thyme events


def test_a_prefilled_code_segments_sandbox_output_event_names_its_code(tokenizer, sandbox):
    """``--prefill`` with a whole code segment: it runs before the first round and is never
    streamed as text, yet its sandbox-output event carries its code and crop regions."""
    from thyme.agent import AgentConfig
    from thyme.testing.scripted import ScriptedBackend

    from .conftest import ANSWER, CROP

    backend = ScriptedBackend(tokenizer, [CROP, ANSWER])  # segment 0 is the prefill
    with running_server(backend, sandbox, agent=AgentConfig(max_new_tokens=400, prefill=CROP)) as srv:
        chunks = list(_client(srv.url).chat.completions.create(model="thyme-test", messages=user_message(), stream=True))
    events = [c.model_extra["thyme"] for c in chunks if (c.model_extra or {}).get("thyme")]
    outputs = [e for e in events if e["event"] == "sandbox_output"]
    assert len(outputs) == 1 and "img.crop((0, 0, 32, 24))" in outputs[0]["code"]
    assert outputs[0]["crops"] and outputs[0]["crops"][0]["box"][:2] == [0, 0] and outputs[0]["images"]
    assert events[-1]["event"] == "done" and events[-1]["stop_reason"] == "answer"
