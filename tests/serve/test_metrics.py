"""``GET /metrics``: Prometheus text with requests, in flight, queue, rounds, sandbox time and
errors by kind, counted as requests are answered."""

from __future__ import annotations

import httpx

from .conftest import running_server, user_message


def _metrics(url) -> dict[str, float]:
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in r.text.splitlines() if line and not line.startswith("#")}


def test_metrics_count_requests_rounds_and_errors_by_kind(scripted, sandbox):
    with running_server(scripted, sandbox, max_images=1) as srv:
        before = _metrics(srv.url)
        assert before["thyme_serve_requests_total"] == 0 and before["thyme_serve_in_flight"] == 0
        ok = httpx.post(srv.url + "/v1/chat/completions", json={"messages": user_message()}, timeout=60)
        assert ok.status_code == 200
        two = user_message()
        two[0]["content"].insert(0, dict(two[0]["content"][0]))
        assert httpx.post(srv.url + "/v1/chat/completions", json={"messages": two}, timeout=60).status_code == 400
        assert httpx.post(srv.url + "/v1/chat/completions", content=b"[1, 2]", timeout=60).status_code == 400
        m = _metrics(srv.url)
    assert m["thyme_serve_requests_total"] == 3
    assert m["thyme_serve_trajectories_total"] == 1
    assert m["thyme_serve_rounds_total"] == len(ok.json()["thyme"]["rounds"]) == 2
    assert m["thyme_serve_sandbox_seconds_total"] > 0
    assert m['thyme_serve_errors_total{kind="limit_exceeded"}'] == 1
    assert m['thyme_serve_errors_total{kind="invalid_request_error"}'] == 1
    assert m["thyme_serve_in_flight"] == 0 and m["thyme_serve_queued"] == 0
