"""``thyme serve --base-url``: with ``stream: true`` the text of each round reaches the client in
many deltas as the upstream streams it (the ``openai`` backend requests ``"stream": true``),
not as one delta when the round ends."""

from __future__ import annotations

from .conftest import running_server, user_message


def test_each_round_streams_in_several_reasoning_deltas_from_the_upstream(sandbox):
    from openai import OpenAI

    from thyme.backends.openai import OpenAIBackend
    from thyme.testing.fake_upstream import ANSWER, CODE, FakeUpstream

    with FakeUpstream() as up, OpenAIBackend(up.base_url, up.model, max_retries=0) as backend:
        with running_server(backend, sandbox) as srv:
            client = OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
            chunks = list(client.chat.completions.create(model="thyme-test", messages=user_message("[code] what is it?"), stream=True))
            plain = client.chat.completions.create(model="thyme-test", messages=user_message("[code] what is it?"))
    rounds: list[list[str]] = [[]]
    for c in chunks:
        event = (c.model_extra or {}).get("thyme")
        if event and event.get("event") == "sandbox_output":
            rounds.append([])
        if c.choices:
            delta = (c.choices[0].delta.model_extra or {}).get("reasoning_content")
            if delta:
                rounds[-1].append(delta)
    assert len(rounds) == 2
    assert "".join(rounds[0]) == CODE and "".join(rounds[1]).startswith(ANSWER.split("<answer>")[0])
    assert len(rounds[0]) > 5 and len(rounds[1]) > 5  # the upstream's pieces, not one delta per round
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content == "B"
    done = [c.model_extra["thyme"] for c in chunks if (c.model_extra or {}).get("thyme", {}).get("event") == "done"]
    assert done and [r["num_tokens"] for r in done[0]["rounds"]] == [r["num_tokens"] for r in plain.model_extra["thyme"]["rounds"]]
