"""Rewards (format, result, consistency, combination) and the judge client against a local server."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from thyme.scoring.judge import JudgeClient, JudgeConfig, JudgeError, JudgeRequestError, parse_verdict
from thyme.train.rewards import (
    RewardConfig,
    RewardInput,
    RewardScore,
    combine,
    compute_rewards,
    consistency_reward,
    format_reward,
    reasoning_tail,
    result_reward,
)

from ..conftest import corpus_records, needs_corpus


# --------------------------------------------------------------------------- a judge server


class JudgeStub:
    """A chat-completions server on 127.0.0.1 answering from a script.

    ``script`` is a list of replies used in order (the last one repeats): ``(status, content)``
    with content the assistant message for 200 and the body otherwise, or a callable taking the
    request JSON and returning such a tuple; ``("sleep", seconds, then)`` waits first. Every
    request body is kept in ``requests``.
    """

    def __init__(self, script):
        self.script = list(script)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                    item = stub.script.pop(0) if len(stub.script) > 1 else stub.script[0]
                if callable(item):
                    item = item(body)
                if item[0] == "sleep":
                    time.sleep(item[1])
                    item = item[2]
                status, content = item[0], item[1]
                headers = item[2] if len(item) > 2 else {}
                if status == 200:
                    payload = json.dumps({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]})
                else:
                    payload = content if isinstance(content, str) else json.dumps(content)
                data = payload.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # many verdicts arrive at once
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def client(self, **kw) -> JudgeClient:
        cfg = dict(base_url=self.url, model="judge-model", backoff_s=0.01, max_backoff_s=0.05, timeout_s=5.0)
        cfg.update(kw)
        return JudgeClient(JudgeConfig(**cfg))

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judge_server():
    servers = []

    def make(script):
        s = JudgeStub(script)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def _by_prompt(correct: int = 1, consistent: int = 1):
    """A judge that answers result prompts with ``correct`` and consistency prompts with ``consistent``."""

    def reply(body):
        prompt = body["messages"][-1]["content"]
        if '"consistent"' in prompt:
            return (200, json.dumps({"consistent": consistent}))
        return (200, json.dumps({"correct": correct}))

    return reply


# --------------------------------------------------------------------------- format


@needs_corpus
def test_format_reward_accepts_every_real_thyme_trajectory():
    recs = corpus_records()
    assert len(recs) == 10
    assert [format_reward(r["response"]) for r in recs] == [1.0] * 10


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>look</think>\n<answer>A</answer>", 1.0),
        ("<think>look</think> <answer>A</answer>\n", 1.0),  # trailing white space after </answer> is fine
        ("<think>look</think><answer>A</answer>", 0.0),  # the reference asks for one white-space character
        ("<think>look</think>\n\n<answer>A</answer>", 0.0),
        ("<think>look</think>\n<answer>A</answer> extra", 0.0),
        ("<think>look\n<answer>A</answer>", 0.0),  # no </think>
        ("<think>a</think>\n<answer>A</answer><answer>B</answer>", 0.0),  # two answers
        ("<think>a<think>b</think>\n<answer>A</answer>", 0.0),  # two <think>
        ("look</think>\n<answer>A</answer>", 0.0),  # no <think>
        ("", 0.0),
    ],
)
def test_format_reward_rules(completion, expected):
    assert format_reward(completion) == expected


# --------------------------------------------------------------------------- result (rules)


@needs_corpus
def test_result_reward_on_the_corpus_trajectories_against_answer_gt():
    got = {r["id"]: result_reward(r["response"], r["answer_gt"], question=r["question"]) for r in corpus_records()}
    # the failure case of the project page answers D (Telehandlers); the reference is A
    assert got["thyme-case-8"].value == 0.0 and got["thyme-case-8"].method == "option"
    assert {k: v.value for k, v in got.items() if k != "thyme-case-8"} == {k: 1.0 for k in got if k != "thyme-case-8"}
    # how each was decided: option letters for the benchmark cases, strings for the free-form ones
    assert got["thyme-case-3"].method == "option"  # "E. The image does not feature the awning-tricycles" vs "E"
    assert got["thyme-case-5"].method == "string"  # "$$0.\overline{642857}$$" vs "0.\overline{642857}"
    assert got["thyme-case-7"].method == "string"  # "1.68, 0.45"
    assert all(v.valid for v in got.values())


@pytest.mark.parametrize(
    "answer, gt, value, method",
    [
        ("<answer>\\frac{1}{2}</answer>", "0.5", 1.0, "math_verify"),
        ("<answer>2/4</answer>", "\\frac{1}{2}", 1.0, "math_verify"),
        ("<answer>\\boxed{3}</answer>", "3", 1.0, "string"),
        ("<answer>The answer is B</answer>", "A", 0.0, "option"),
        ("<answer>(A)</answer>", "A", 1.0, "option"),
        ("<answer>The answer is: 12 km</answer>", "12 km", 1.0, "string"),
        ("<answer>\\text{Paris}</answer>", "paris", 1.0, "string"),
        ("<answer>3</answer>", "4", 0.0, "rules"),
        ("<think>no answer here</think>", "4", 0.0, "no_answer"),
        ("<answer></answer>", "4", 0.0, "no_answer"),
    ],
)
def test_result_reward_rules(answer, gt, value, method):
    r = result_reward(answer, gt)
    assert (r.value, r.method, r.valid) == (value, method, True)


def test_result_reward_reads_the_option_text_when_options_are_known():
    opts = {"A": "Exavators", "B": "Graders", "C": "Cranes", "D": "Telehandlers"}
    assert result_reward("<answer>Telehandlers</answer>", "D", options=opts).value == 1.0
    assert result_reward("<answer>Cranes</answer>", "D", options=opts).value == 0.0


# --------------------------------------------------------------------------- judge client


def test_judge_retries_5xx_429_and_timeouts_then_answers(judge_server):
    s = judge_server([(500, "overloaded"), (429, "slow down", {"Retry-After": "0"}), ("sleep", 0.6, (200, '{"correct": 1}')), (200, 'Sure: ```json\n{"correct": 1}\n```')])
    judge = s.client(timeout_s=0.3)
    v = judge.judge("Is it right?", "correct", [0, 1])
    assert v.value == 1 and v.attempts == 4
    # the request we send: one user message, greedy, JSON-constrained by a schema
    body = s.requests[-1]["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert body["messages"] == [{"role": "user", "content": "Is it right?"}]
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["properties"] == {"correct": {"enum": [0, 1]}} and schema["required"] == ["correct"]
    assert s.requests[-1]["path"] == "/v1/chat/completions"


def test_judge_gives_up_after_max_retries(judge_server):
    s = judge_server([(503, "down")])
    with pytest.raises(JudgeError, match="failed after 3 attempt"):
        s.client(max_retries=2).judge("q", "correct", [0, 1])
    assert len(s.requests) == 3


def test_judge_other_4xx_is_a_clear_error_at_once(judge_server):
    s = judge_server([(404, '{"error": "model judge-model not found"}')])
    with pytest.raises(JudgeRequestError) as e:
        s.client(api_key="sk-test").judge("q", "correct", [0, 1])
    assert "HTTP 404" in str(e.value) and "judge-model" in str(e.value)
    assert len(s.requests) == 1 and s.requests[0]["auth"] == "Bearer sk-test"


def test_judge_reply_that_is_not_the_json_asked_for_is_asked_again_then_fails(judge_server):
    s = judge_server([(200, "I think it is correct."), (200, '{"correct": 7}'), (200, '{"verdict": 1}')])
    with pytest.raises(JudgeError, match="not the JSON asked for"):
        s.client(parse_retries=2).judge("q", "correct", [0, 1])
    assert len(s.requests) == 3


@pytest.mark.parametrize(
    "text, value",
    [('{"correct": 1}', 1), ('{"Correct": "0"}', 0), ('Answer:\n{"correct": 1.0} done', 1), ('```\n{"option": "b"}\n```', "B")],
)
def test_parse_verdict_is_lenient_about_wrapping(text, value):
    key = "option" if "option" in text else "correct"
    allowed = ["A", "B", "Z"] if key == "option" else [0, 1]
    assert parse_verdict(text, key, allowed) == value


# --------------------------------------------------------------------------- judged rewards


def test_result_judge_decides_when_no_rule_does_and_its_failure_is_invalid_not_zero(judge_server):
    ok = judge_server([_by_prompt(correct=1)]).client()
    r = result_reward("<answer>Paris, France</answer>", "Paris", question="Capital of France?", judge=ok)
    assert (r.value, r.method, r.valid) == (1.0, "judge", True)

    broken = judge_server([(500, "down")]).client(max_retries=1)
    r = result_reward("<answer>Paris, France</answer>", "Paris", judge=broken)
    assert r.value is None and r.valid is False and r.method == "judge_failed" and "500" in r.detail
    # a rule decides first: no judge call at all
    s = judge_server([_by_prompt(correct=0)])
    assert result_reward("<answer>C. S QT 911</answer>", "C", judge=s.client()).value == 1.0
    assert s.requests == []


def test_result_judge_refused_request_raises():
    s = JudgeStub([(400, '{"error": "response_format not supported"}')])
    try:
        with pytest.raises(JudgeRequestError, match="response-format none"):
            result_reward("<answer>Paris, France</answer>", "Paris", judge=s.client())
    finally:
        s.close()


def test_reasoning_tail_drops_sandbox_output_and_tags():
    completion = (
        "<think>Crop it.\n<code>\n```python\nprint(1)\n```\n</code>\n<sandbox_output>SECRET 0.447<image></sandbox_output>\n"
        "So the value is 0.45.</think>\n<answer>0.45</answer>"
    )
    tail = reasoning_tail(completion, 500)
    assert "SECRET" not in tail and "<" not in tail and "print(1)" in tail and tail.endswith("So the value is 0.45.")
    assert reasoning_tail("x" * 900 + "</think>\n<answer>1</answer>", 500) == "x" * 500


def test_consistency_is_judged_on_the_reasoning_tail(judge_server):
    s = judge_server([_by_prompt(consistent=0)])
    c = consistency_reward("<think>" + "pad " * 300 + "so it is B.</think>\n<answer>A</answer>", question="q", judge=s.client())
    assert (c.value, c.method) == (0.0, "judge")
    prompt = s.requests[0]["body"]["messages"][0]["content"]
    assert "so it is B." in prompt and "pad " * 130 not in prompt  # only the last 500 characters
    assert s.requests[0]["body"]["response_format"]["json_schema"]["schema"]["properties"] == {"consistent": {"enum": [0, 1]}}
    assert consistency_reward("<answer>A</answer>", judge=None).method == "skipped"


def test_combination_and_weights():
    one, zero = RewardScore(1.0), RewardScore(0.0)
    assert combine(1.0, one, one) == 2.0  # 1 * (1 + 0.5) + 0.5
    assert combine(1.0, one, zero) == 1.5
    assert combine(0.0, zero, RewardScore(None, True, "skipped")) == 0.0
    assert combine(1.0, zero, RewardScore(None, True, "skipped")) == 0.5
    assert combine(1.0, RewardScore(None, False, "judge_failed"), zero) is None
    cfg = RewardConfig(consistency_weight=1.0, format_weight=0.25, result_weight=2.0)
    assert combine(1.0, one, one, cfg) == 2.0 * 2.0 + 0.25


@needs_corpus
def test_compute_rewards_on_the_corpus_with_a_judge(judge_server):
    s = judge_server([_by_prompt(correct=1, consistent=1)])
    recs = corpus_records()
    items = [RewardInput(r["response"], r["answer_gt"], question=r["question"]) for r in recs]
    out = compute_rewards(items, judge=s.client())
    totals = {r["id"]: b.total for r, b in zip(recs, out)}
    assert totals["thyme-case-8"] == 0.5  # wrong answer: only the format term
    assert {k: v for k, v in totals.items() if k != "thyme-case-8"} == {r["id"]: 2.0 for r in recs if r["id"] != "thyme-case-8"}
    # every result was decided by the rules; consistency was asked only for the 9 correct ones
    prompts = [q["body"]["messages"][0]["content"] for q in s.requests]
    assert len(prompts) == 9 and all('"consistent"' in p for p in prompts)
    assert all(b.valid for b in out)


@needs_corpus
def test_compute_rewards_reports_a_failing_consistency_judge_as_invalid(judge_server):
    s = judge_server([(200, "no idea")])
    recs = corpus_records()[:2]
    out = compute_rewards([RewardInput(r["response"], r["answer_gt"]) for r in recs], judge=s.client(parse_retries=0))
    assert [b.total for b in out] == [None, None] and [b.valid for b in out] == [False, False]
    assert all(b.result.value == 1.0 and b.consistency.method == "judge_failed" for b in out)
