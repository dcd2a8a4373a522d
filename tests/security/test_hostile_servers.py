"""Threat-model class "Hostile or broken servers": the model backend and the judge against a
loopback server that trickles, floods, nests, hangs and answers garbage
(:mod:`thyme.testing.hostile_server`). Every request ends within its deadline (the bound
asserted is a generous correctness bound, 3x the deadline, not a benchmark) with a clear error
of its own, and the good requests of the same batch still succeed."""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest

from thyme.backends.base import GenerationRequest
from thyme.backends.openai import OpenAIBackend, OpenAIBatchError, OpenAIServerError
from thyme.cli import main as thyme_main
from thyme.http import HTTPLimits, ResponseTooLarge, fetch_sync, loads_bounded, resolve_proxy
from thyme.scoring.judge import JudgeClient, JudgeConfig, JudgeError, Verdict, parse_verdict
from thyme.testing.hostile_server import HostileServer

from ..evaluate.test_benchmark_data import hrbench_tsv

DEADLINE = 1.0
BOUND = 3 * DEADLINE
BAD_MODES = ("trickle", "trickle_headers", "flood", "flood_declared", "nest", "hang", "not_json", "html", "wrong_types", "gzip_bomb")


@pytest.fixture()
def server():
    with HostileServer() as s:
        yield s


def _req(mode: str = "ok") -> GenerationRequest:
    text = f"Question about THYME-HOSTILE:{mode}"
    return GenerationRequest(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": text}]}], max_new_tokens=8
    )


def _backend(url: str, **kw) -> OpenAIBackend:
    kw.setdefault("timeout_s", DEADLINE)
    kw.setdefault("max_retries", 0)
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("max_response_mb", 4)
    return OpenAIBackend(url, "hostile", **kw)


# --------------------------------------------------------------------------- the model backend


def test_backend_batch_each_hostile_request_fails_alone_within_its_deadline(server):
    modes = ["ok", *BAD_MODES, "ok"]
    with _backend(server.url()) as b:
        t0 = time.monotonic()
        with pytest.raises(OpenAIBatchError) as ei:
            b.generate([_req(m) for m in modes])
        took = time.monotonic() - t0
    err = ei.value
    assert took < BOUND, f"the batch took {took:.1f} s with a {DEADLINE} s deadline"
    assert err.errors[0] is None and err.errors[-1] is None
    assert err.generations[0].text == '{"correct": 1}' and err.generations[-1].text == '{"correct": 1}'
    by_mode = dict(zip(modes[1:-1], err.errors[1:-1]))
    assert all(isinstance(e, OpenAIServerError) for e in by_mode.values()), by_mode
    for m in ("trickle", "trickle_headers", "hang"):
        assert "deadline" in str(by_mode[m]) and server.url() in str(by_mode[m])
    for m in ("flood", "flood_declared"):
        assert "over the cap of 4194304 bytes" in str(by_mode[m]) and server.url() in str(by_mode[m])
    assert "over the limit of 64 (max_depth)" in str(by_mode["nest"])
    assert "not usable JSON" in str(by_mode["not_json"]) and "Welcome to nginx" in str(by_mode["html"])
    assert "malformed completion" in str(by_mode["wrong_types"])
    assert "compressed" in str(by_mode["gzip_bomb"])
    assert server.sent["flood"] < 40 * 2**20  # reading stopped at the cap: the 100 MiB were never taken
    assert server.sent.get("flood_declared", 0) < 40 * 2**20


def test_a_trickle_is_retried_then_fails_at_its_deadlines(server):
    with _backend(server.url("trickle"), max_retries=1) as b:
        t0 = time.monotonic()
        with pytest.raises(OpenAIServerError, match="deadline.*gave up after 2 attempts") as ei:
            b.generate([_req("trickle")])
        took = time.monotonic() - t0
    assert took < 2 * BOUND and ei.value.retryable and b.stats["requests"] == 2


def test_flood_memory_stays_near_the_cap(server):
    tracemalloc.start()
    try:
        with pytest.raises(ResponseTooLarge, match="over the cap of 2097152 bytes"):
            fetch_sync(
                "POST", server.url("flood") + "/chat/completions", HTTPLimits(deadline_s=10, max_response_bytes=2 * 2**20), content=b"{}"
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB for a 2 MiB cap"
    assert server.sent["flood"] < 40 * 2**20


@pytest.mark.parametrize("mode", ["trickle", "flood", "nest", "hang", "not_json", "wrong_types"])
def test_list_models_and_describe_survive_a_hostile_models_endpoint(mode):
    with HostileServer(models_mode=mode) as s, _backend(s.url()) as b:
        t0 = time.monotonic()
        assert b.list_models() == []
        assert b.describe()["server_model"] is None
        assert time.monotonic() - t0 < 2 * BOUND  # two listings


def test_a_404_hint_never_blocks_the_event_loop_of_the_other_requests():
    # a 404 asks GET /models for its hint; here that listing hangs: it must wait on the loop
    # asynchronously (the old code called a blocking request inside the shared loop)
    with HostileServer(models_mode="hang") as s, _backend(s.url(), timeout_s=3.0) as b:
        done: dict[int, float] = {}
        t0 = time.monotonic()
        with pytest.raises(OpenAIBatchError) as ei:
            b.generate(
                [_req("notfound"), _req("slow_ok"), _req("slow_ok"), _req("slow_ok")],
                stream=lambda i, _t: done.setdefault(i, time.monotonic() - t0),
            )
        took = time.monotonic() - t0
    e = ei.value.errors[0]
    assert isinstance(e, OpenAIServerError) and e.status == 404 and all(x is None for x in ei.value.errors[1:])
    assert sorted(done) == [1, 2, 3]
    assert any(c == "GET" and p.rstrip("/").endswith("/models") for c, p, _, _ in s.requests)  # the hint's listing was asked
    # the good answers are not held up by the listing, which hangs up to its 3 s deadline (a blocking
    # call in the shared loop held them until then); whether the 404 itself returned before or after
    # them depends on when the listing's connection was served, so only the good answers are timed
    assert max(done.values()) < 1.5, (done, took)


# --------------------------------------------------------------------------- the judge


def _judge(url: str, **kw) -> JudgeClient:
    cfg = dict(base_url=url, model="judge", timeout_s=DEADLINE, max_retries=0, parse_retries=0, backoff_s=0.01, max_response_mb=4)
    cfg.update(kw)
    return JudgeClient(JudgeConfig(**cfg))


def test_judge_batch_each_hostile_verdict_fails_alone_within_its_deadline(server):
    modes = ["ok", *BAD_MODES, "nest_content", "ok"]
    t0 = time.monotonic()
    verdicts = _judge(server.url()).judge_many([f"Is it right? THYME-HOSTILE:{m}" for m in modes], "correct", [0, 1])
    took = time.monotonic() - t0
    assert took < BOUND, f"the batch took {took:.1f} s with a {DEADLINE} s deadline"
    assert isinstance(verdicts[0], Verdict) and verdicts[0].value == 1 and isinstance(verdicts[-1], Verdict) and verdicts[-1].value == 1
    by_mode = dict(zip(modes[1:-1], verdicts[1:-1]))
    assert all(isinstance(v, JudgeError) for v in by_mode.values()), by_mode
    assert "deadline" in str(by_mode["hang"]) and "over the cap" in str(by_mode["flood"])
    assert "over the limit of 64 (max_depth)" in str(by_mode["nest"]) and "not the JSON asked for" in str(by_mode["nest_content"])
    assert "content is a dict" in str(by_mode["wrong_types"])
    # 200000 "{" before the verdict: read at once (the old parser's quadratic worst case)
    (v,) = _judge(server.url()).judge_many(["THYME-HOSTILE:brace_bomb"], "correct", [0, 1])
    assert isinstance(v, Verdict) and v.value == 1


def test_verdict_parser_is_linear_and_keeps_its_formats():
    # the old parser scanned from every "{" to its match: quadratic (200000 braces ~ 2e10 steps)
    t0 = time.monotonic()
    for text in ("{" * 200000, "{" * 100000 + "}" * 100000, '{"a": ' * 50000 + "1" + "}" * 50000, "[" * 100000 + '{"correct": 1}'):
        try:
            parse_verdict(text, "correct", [0, 1])
        except ValueError:
            pass
    assert time.monotonic() - t0 < 5.0
    assert parse_verdict("[" * 100000 + '{"correct": 1}', "correct", [0, 1]) == 1
    assert parse_verdict('text {not json {"correct": 0}} more', "correct", [0, 1]) == 0
    assert parse_verdict('```json\n{"option": "c"}\n``` and {"option": "A"}', "option", ["A", "C"]) == "C"
    assert parse_verdict('Sure. {"Correct": "1"}', "correct", [0, 1]) == 1
    with pytest.raises(ValueError, match="no JSON object"):
        parse_verdict('{"correct": ' + "9" * 5000 + "}", "correct", [0, 1])  # a huge int fails that candidate only
    assert parse_verdict('{"correct": ' + "9" * 5000 + '} {"correct": 1}', "correct", [0, 1]) == 1
    with pytest.raises(ValueError, match="no key"):
        parse_verdict('{"result": {"correct": 1}}', "correct", [0, 1])


def test_loads_bounded_turns_every_failure_into_a_value_error():
    for text in ("[" * 100000 + "]" * 100000, "[" * 65 + "]" * 65, b"\xff\xfe", "1" * 10000, "{"):
        with pytest.raises(ValueError):
            loads_bounded(text, 64)
    assert loads_bounded("[" * 64 + "]" * 64, 64) is not None


def test_rule_decided_rollouts_keep_their_rewards_when_the_judge_nests(server):
    from thyme.train.rewards import RewardInput, compute_rewards

    judge = _judge(server.url("nest_content"))
    items = [
        RewardInput("<think>a</think>\n<answer>B</answer>", "A", "Which?", {"A": "cat", "B": "dog"}),  # rules: wrong
        RewardInput("<think>a</think>\n<answer>something odd</answer>", "A", "Which?", {}),  # no rule: the judge decides
    ]
    out = compute_rewards(items, judge=judge)
    assert out[0].result.method != "judge_failed" and out[0].result.value == 0.0 and out[0].valid
    assert out[1].result.method == "judge_failed" and not out[1].valid and "not the JSON asked for" in out[1].result.detail


@pytest.mark.parametrize("mode", ["nest", "nest_content", "wrong_types", "hang"])
def test_rl_scoring_with_a_hostile_judge_masks_only_the_rollouts_that_needed_it(server, mode):
    # before: a RecursionError left compute_rewards, and score_rollouts masked every rollout
    from thyme.agent import Trajectory, Turn
    from thyme.rollout import Rollout
    from thyme.train.rl.data import RLPrompt
    from thyme.train.rl.trainer import score_rollouts

    def ro(i, text):
        t = Trajectory(id=f"x{i}", question="q", images=[], turns=[Turn(0, text, "stop", "answer")])
        return Rollout(f"x{i}#0", f"x{i}", [1], trajectory=t)

    p = RLPrompt("x", [], [], "B", "Q? A. no B. yes", {"A": "no", "B": "yes"})
    rollouts = [
        ro(0, "<think>it is A</think>\n<answer>A</answer>"),
        ro(1, "<think>hm</think>\n<answer>maybe, who knows</answer>"),
        ro(2, "<think>it is A</think>\n<answer>A</answer>"),
    ]
    out = score_rollouts(rollouts, [p] * 3, judge=_judge(server.url(mode)))
    assert [r.mask_reason for r in rollouts] == [None, "judge_failed", None]
    assert out[0]["total"] == 0.5 and out[2]["total"] == 0.5 and out[0]["methods"]["result"] == "option"
    assert out[1]["total"] is None and "judge_failed" in rollouts[1].trajectory.error


def test_eval_with_a_nesting_judge_still_writes_metrics(server, tmp_path, capsys):
    tsv = hrbench_tsv(tmp_path / "hr.tsv")
    server.ok_content = "<answer>hmm, hard to say</answer>"  # no rule reads it: the judge is asked
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {max_retries: 0, timeout_s: 5}\njudge: {max_retries: 0, timeout_s: 5, parse_retries: 0}\n")
    out = tmp_path / "o"
    rc = thyme_main(
        [
            "eval",
            "--benchmark",
            "hrbench4k",
            "--data",
            str(tsv),
            "--base-url",
            server.url(),
            "--model",
            "hostile",
            "--out",
            str(out),
            "--judge-base-url",
            server.url("nest"),
            "--judge-model",
            "j",
            "--no-report",
            "--config",
            str(cfg),
        ]
    )
    assert rc == 0, capsys.readouterr()
    m = json.loads((out / "metrics.json").read_text())
    assert m["counts"]["judge_invalid"] == 4 and m["counts"]["judged"] == 0 and m["overall"] == 0.0


# --------------------------------------------------------------------------- one proxy policy


def test_proxy_policy_resolution():
    env = {"HTTPS_PROXY": "http://p:3128", "http_proxy": "http://q:3128", "NO_PROXY": "internal.example,.corp"}
    assert resolve_proxy("https://api.example.com/v1", "env", env) == "http://p:3128"
    assert resolve_proxy("http://api.example.com/v1", "env", env) == "http://q:3128"
    for direct in (
        "http://127.0.0.1:8000/v1",
        "http://localhost:8000/v1",
        "http://[::1]:8000/v1",
        "http://internal.example/v1",
        "http://a.corp/v1",
    ):
        assert resolve_proxy(direct, "env", env) is None, direct
    assert resolve_proxy("https://api.example.com/v1", "none", env) is None
    assert resolve_proxy("http://127.0.0.1:8000/v1", "http://proxy:1", env) == "http://proxy:1"
    from thyme.errors import ThymeError

    with pytest.raises(ThymeError, match="proxy must be 'env', 'none' or an http"):
        OpenAIBackend("http://127.0.0.1:9/v1", "m", proxy="socks")
    with pytest.raises(ThymeError, match="judge proxy must be"):
        _judge("http://127.0.0.1:9/v1", proxy="yes")
    with pytest.raises(ThymeError, match="max_response_mb"):
        OpenAIBackend("http://127.0.0.1:9/v1", "m", max_response_mb=0)


def test_generation_listing_and_judge_follow_the_same_proxy_policy(monkeypatch):
    # the hostile server doubles as a forward proxy (it answers absolute-URI requests in "ok")
    with HostileServer() as proxy:
        upstream = "http://thyme-upstream.invalid/v1"
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("http_proxy", raising=False)
        with _backend(upstream, api_key="sk-model") as b:
            (g,) = b.generate([_req("ok")])
            assert g.text == '{"correct": 1}' and b.list_models() == [{"id": "hostile", "object": "model"}]
        assert _judge(upstream, api_key="sk-judge").judge("q", "correct", [0, 1]).value == 1
        seen = [(m, p) for m, p, _mode, _auth in proxy.requests]
        assert seen == [("POST", upstream + "/chat/completions"), ("GET", upstream + "/models"), ("POST", upstream + "/chat/completions")]
        # proxy="none": nothing goes through it, for every kind of call
        n = len(proxy.requests)
        with _backend(upstream, proxy="none", timeout_s=5) as b:
            with pytest.raises(OpenAIServerError, match="cannot reach"):
                b.generate([_req("ok")])
            assert b.list_models() == []
        with pytest.raises(JudgeError):
            _judge(upstream, proxy="none", timeout_s=5).judge("q", "correct", [0, 1])
        assert len(proxy.requests) == n


def test_requests_to_loopback_never_go_through_an_environment_proxy(monkeypatch, server):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # a dead proxy: any use would fail
    with _backend(server.url()) as b:
        (g,) = b.generate([_req("ok")])
        assert g.text and b.list_models()
    assert _judge(server.url()).judge("q", "correct", [0, 1]).value == 1
