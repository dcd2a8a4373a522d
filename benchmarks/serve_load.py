"""Fault-injected load test of ``thyme serve --base-url`` (issue 20), bounded, on loopback.

``thyme serve`` runs in its own process (the real command: ``python -m thyme.cli serve
--base-url ... --timeout-s 1 --max-retries 1``, YAML ``model.backoff_s: 0.05``) over an
instant fake OpenAI-compatible upstream (:class:`thyme.testing.fake_upstream.FakeUpstream`,
a real HTTP server in this process), so the ``openai`` backend's real client, retries and
deadline handle the faults. 200 requests at concurrency 64 (``--max-sessions 16 --max-queue
256``: every request is admitted, none gets a 429), half of them running code in the real
sandbox (bubblewrap), a quarter streamed; 10% of the requests meet a failing upstream call
(HTTP 500 on every attempt, in round 0 or, for a code question, in round 1 while its sandbox
session is open) and 5% a hanging one (the upstream waits 10 s, past the 1 s deadline, on
every attempt); another 5% are streamed by a client that goes away after the first chunk,
while its trajectory runs (its code ran, its round 1 upstream call is slow); another 6% run code
that loops past the sandbox's time limit (``--timeout 2``), exits its process or raises (the
model answers after the error: they must be answered). Before the measured run, a warm-up of 20 requests of the same mix; the
baseline is taken after it.

Printed: requests ok / clean errors (an OpenAI-shaped error body with a status, or an error
chunk then ``[DONE]`` in a stream) / abandoned by their client (and the disconnects the
server counted) / other (anything else: what must be 0), each request's
outcome against what its faults call for, p50/p99 latency of the ok and of the error
requests, the upstream's call counts, and what is left after the run (settled: no request
running): processes under the server (the sandbox's bubblewrap and zygote stay; session
processes must be gone), sandbox session folders, request folders, the server's RSS before /
peak / after (tolerance: +64 MiB) and its sandbox processes' RSS; then one JSON line. Exit
status 0 when every invariant holds, 1 otherwise.

    PYTHONPATH=src python benchmarks/serve_load.py [--requests 200] [--concurrency 64] [--fail 0.10] [--hang 0.05] [--abandon 0.05] [--code 0.5]

About 30 s on 2 cores.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _stats import pct  # noqa: E402

MiB = 1024 * 1024


def image_url() -> str:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (64, 48), "white")
    ImageDraw.Draw(im).rectangle((8, 8, 40, 30), fill="red")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--fail", type=float, default=0.10, help="share of requests meeting a failing upstream call")
    p.add_argument("--hang", type=float, default=0.05, help="share of requests meeting a hanging upstream call")
    p.add_argument("--abandon", type=float, default=0.05, help="share of requests whose client goes away after the first chunk")
    p.add_argument("--sandbox-faults", type=float, default=0.06, help="share of requests whose code loops, exits or raises")
    p.add_argument("--code", type=float, default=0.5, help="share of requests running code in the sandbox")
    p.add_argument("--stream", type=float, default=0.25, help="share of requests streamed")
    p.add_argument("--max-sessions", type=int, default=16)
    p.add_argument("--timeout-s", type=float, default=1.0, help="the openai backend's deadline of one upstream call")
    p.add_argument("--hang-s", type=float, default=10.0, help="how long a hanging upstream call waits")
    p.add_argument("--rss-tolerance-mb", type=float, default=64.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    from thyme.testing.serve_load import FakeUpstream, Peaks, ServeProcess, expected, metric, questions, run_load, settle, snapshot

    url = image_url()
    t_start = time.perf_counter()
    with FakeUpstream(hang_s=a.hang_s) as up:
        sp = ServeProcess.over_upstream(
            up.base_url,
            up.model,
            timeout_s=a.timeout_s,
            max_retries=1,
            max_sessions=a.max_sessions,
            max_queue=max(256, a.requests),
            extra=("--timeout", "2"),
        )
        try:
            warm = questions(
                20, fail=a.fail, hang=a.hang, code=a.code, abandon=a.abandon, sandbox_faults=a.sandbox_faults, seed=a.seed + 1000
            )
            run_load(sp.url, up.model, warm, concurrency=16, image_url=url)
            before = settle(sp, snapshot(sp))
            gone_before = metric(sp.url, "thyme_serve_disconnects_total") or 0
            up.reset()
            qs = questions(
                a.requests, fail=a.fail, hang=a.hang, code=a.code, abandon=a.abandon, sandbox_faults=a.sandbox_faults, seed=a.seed
            )
            t0 = time.perf_counter()
            with Peaks(sp) as peaks:
                outcomes = run_load(sp.url, up.model, qs, concurrency=a.concurrency, image_url=url, stream_share=a.stream, seed=a.seed)
            wall = time.perf_counter() - t0
            after = settle(sp, before)
            disconnects = int((metric(sp.url, "thyme_serve_disconnects_total") or 0) - gone_before)
            stats = {k: v for k, v in up.stats.items() if k not in ("service_s", "usage")}
        finally:
            rc = sp.stop()
    kinds = Counter(o.kind for o in outcomes)
    mismatched = [o for o in outcomes if o.kind != expected(o.question)]
    ok_s = [o.seconds for o in outcomes if o.kind == "ok"]
    err_s = [o.seconds for o in outcomes if o.kind == "clean_error"]
    statuses = Counter(f"{o.status}{' (stream)' if o.streamed else ''}" for o in outcomes if o.kind == "clean_error")
    n_fail, n_hang = round(a.requests * a.fail), round(a.requests * a.hang)
    rss_ok = after.rss <= before.rss + a.rss_tolerance_mb * MiB
    leftovers = {
        "processes_before": len(before.processes),
        "processes_peak": peaks.processes,
        "processes_after": len(after.processes),
        "same_processes": after.processes == before.processes,
        "session_folders_peak": peaks.session_folders,
        "session_folders_after": len(after.session_folders),
        "request_folders_peak": peaks.request_folders,
        "request_folders_after": len(after.request_folders),
        "health_after": after.health,
    }
    checks = {
        "no_other_outcome": kinds.get("other", 0) == 0,
        "each_outcome_as_its_faults_call_for": not mismatched,
        "no_process_left": leftovers["same_processes"],
        "no_session_folder_left": not after.session_folders,
        "no_request_folder_left": not after.request_folders,
        "idle_after": after.health == {"status": "ok", "running": 0, "queued": 0},
        "rss_back_within_tolerance": rss_ok,
        "stopped_cleanly": rc == 0,
    }
    print(
        f"thyme serve load: {a.requests} requests at concurrency {a.concurrency} (max_sessions {a.max_sessions}), "
        f"{n_fail} with a failing upstream call, {n_hang} with a hanging one (deadline {a.timeout_s:g} s, 1 retry), "
        f"{round(a.requests * a.abandon)} whose client goes away mid-stream, "
        f"{round(a.requests * a.sandbox_faults)} whose code loops, exits or raises, "
        f"{round(a.requests * a.code)} running code, ~{a.stream:.0%} streamed"
    )
    print(f"  ran in {wall:.1f} s ({a.requests / wall:.1f} requests/s)")
    print(
        f"  outcomes: ok {kinds.get('ok', 0)}, clean errors {kinds.get('clean_error', 0)} ({dict(statuses)}), "
        f"abandoned by the client {kinds.get('abandoned', 0)} (disconnects counted by the server: {disconnects}), other {kinds.get('other', 0)}"
    )
    print(f"  outcomes not as the faults call for: {len(mismatched)}")
    for o in mismatched[:10]:
        print(f"    {o.question!r}: {o.kind} {o.status} {o.note}")
    print(
        f"  latency ok: p50 {pct(ok_s, 50) * 1e3:.0f} ms, p99 {pct(ok_s, 99) * 1e3:.0f} ms; "
        f"errors: p50 {pct(err_s, 50) * 1e3:.0f} ms, p99 {pct(err_s, 99) * 1e3:.0f} ms"
    )
    print(f"  upstream calls: {stats}")
    print(
        f"  processes under the server: before {leftovers['processes_before']}, peak {peaks.processes}, after {leftovers['processes_after']} (same pids: {leftovers['same_processes']})"
    )
    print(
        f"  sandbox session folders: peak {peaks.session_folders}, after {leftovers['session_folders_after']}; "
        f"request folders: peak {peaks.request_folders}, after {leftovers['request_folders_after']}"
    )
    print(
        f"  server RSS: before {before.rss / MiB:.1f} MiB, peak {peaks.rss / MiB:.1f} MiB, after {after.rss / MiB:.1f} MiB "
        f"(delta {(after.rss - before.rss) / MiB:+.1f} MiB, tolerance +{a.rss_tolerance_mb:g} MiB); "
        f"sandbox processes' RSS before {before.process_rss / MiB:.1f} MiB, after {after.process_rss / MiB:.1f} MiB"
    )
    print(f"  health after: {after.health}; exit status after SIGTERM: {rc}")
    print("  " + ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in checks.items()))
    figures = {
        "requests": a.requests,
        "concurrency": a.concurrency,
        "max_sessions": a.max_sessions,
        "fail_share": a.fail,
        "hang_share": a.hang,
        "abandon_share": a.abandon,
        "sandbox_fault_share": a.sandbox_faults,
        "code_share": a.code,
        "wall_s": round(wall, 2),
        "ok": kinds.get("ok", 0),
        "clean_errors": kinds.get("clean_error", 0),
        "abandoned": kinds.get("abandoned", 0),
        "disconnects_counted": disconnects,
        "other": kinds.get("other", 0),
        "mismatched": len(mismatched),
        "ok_p50_ms": round(pct(ok_s, 50) * 1e3, 1),
        "ok_p99_ms": round(pct(ok_s, 99) * 1e3, 1),
        "error_p50_ms": round(pct(err_s, 50) * 1e3, 1),
        "error_p99_ms": round(pct(err_s, 99) * 1e3, 1),
        "upstream": stats,
        "leftovers": leftovers,
        "rss_before_mib": round(before.rss / MiB, 1),
        "rss_peak_mib": round(peaks.rss / MiB, 1),
        "rss_after_mib": round(after.rss / MiB, 1),
        "rss_tolerance_mib": a.rss_tolerance_mb,
        "sandbox_rss_before_mib": round(before.process_rss / MiB, 1),
        "sandbox_rss_after_mib": round(after.process_rss / MiB, 1),
        "checks": checks,
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(figures))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
