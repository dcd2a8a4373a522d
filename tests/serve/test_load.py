"""A small fault-injected load on ``thyme serve --base-url`` in its own process (the ``openai``
backend's real HTTP client against :class:`thyme.testing.fake_upstream.FakeUpstream`): 40
requests at concurrency 16, 10% meeting a failing upstream call (HTTP 500, retried), 5% a
hanging one (past the backend's 1 s deadline, retried), 5% streamed by a client that goes away
after the first chunk while its trajectory runs, 10% whose code loops past the sandbox's 2 s
limit, exits its process or raises (answered all the same), half of them running code in the
sandbox, a quarter streamed. Every request gets its answer or a clean OpenAI-shaped error, never
another's; afterwards no sandbox session, process or folder is left and the server's
memory is back near its baseline. (The 200-request version with figures:
``benchmarks/serve_load.py``.)"""

from __future__ import annotations

from collections import Counter

import pytest

from .conftest import data_url

N, CONCURRENCY = 40, 16
#: Growth of the server's RSS allowed over the run (after a warm-up run of the same mix).
RSS_TOLERANCE = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def loaded():
    from thyme.testing.serve_load import FakeUpstream, Peaks, ServeProcess, metric, questions, run_load, settle, snapshot

    with FakeUpstream(hang_s=10) as up:
        sp = ServeProcess.over_upstream(
            up.base_url, up.model, timeout_s=1.0, max_retries=1, max_sessions=8, max_queue=64, extra=("--timeout", "2")
        )
        try:
            run_load(sp.url, up.model, questions(8, abandon=0.1, seed=99), concurrency=8, image_url=data_url())  # warm-up: same mix
            before = settle(sp, snapshot(sp))
            gone_before = metric(sp.url, "thyme_serve_disconnects_total")
            up.reset()
            qs = questions(N, abandon=0.05, sandbox_faults=0.1, seed=1)
            with Peaks(sp) as peaks:
                outcomes = run_load(sp.url, up.model, qs, concurrency=CONCURRENCY, image_url=data_url())
            after = settle(sp, before)
            disconnects = metric(sp.url, "thyme_serve_disconnects_total") - gone_before
            stats = dict(up.stats)
        finally:
            rc = sp.stop()
        yield {
            "qs": qs,
            "outcomes": outcomes,
            "before": before,
            "after": after,
            "peaks": peaks,
            "stats": stats,
            "rc": rc,
            "log": sp.log_tail(),
            "disconnects": disconnects,
        }


def test_every_request_gets_its_answer_or_a_clean_error(loaded):
    from thyme.testing.serve_load import expected

    outcomes = loaded["outcomes"]
    assert len(outcomes) == N
    wrong = [(o.question, o.kind, o.status, o.note) for o in outcomes if o.kind != expected(o.question)]
    assert not wrong, wrong
    kinds = Counter(o.kind for o in outcomes)
    assert kinds == {"ok": N - 8, "clean_error": 6, "abandoned": 2}  # 4 failing + 2 hanging; 2 clients gone
    assert sum(1 for q in loaded["qs"] if "[code:" in q) == 4  # among the ok: loop, exit, error, loop
    assert 1 <= loaded["disconnects"] <= 2  # the server saw the clients go (one may have finished first)
    assert {o.note for o in outcomes if o.kind == "clean_error"} == {"trajectory_error"}
    assert {o.streamed for o in outcomes if o.kind == "clean_error"} | {o.streamed for o in outcomes if o.kind == "ok"} == {True, False}
    # the faults went through the backend's retries: two calls each
    assert loaded["stats"]["failed"] == 2 * 4 and loaded["stats"]["hung"] == 2 * 2


def test_nothing_is_left_behind(loaded):
    before, after, peaks = loaded["before"], loaded["after"], loaded["peaks"]
    assert peaks.session_folders > 0 and peaks.processes > len(before.processes)  # sessions did run
    assert after.processes == before.processes  # the zygote stays; no session process remains
    assert after.session_folders == [] and after.request_folders == []
    assert after.health == {"status": "ok", "running": 0, "queued": 0}
    assert after.rss <= before.rss + RSS_TOLERANCE, (before.rss, after.rss)
    assert loaded["rc"] == 0, loaded["log"]  # and it still stops cleanly on SIGTERM
