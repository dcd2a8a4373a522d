"""Replay throughput with 1, 2, ... N worker processes (``thyme replay --workers N``).

Run from the repository root::

    .venv/bin/python benchmarks/replay.py                 # the corpus 30 times over: 300 records
    .venv/bin/python benchmarks/replay.py --repeat 50 --workers 1 2 4

Needs the real corpus at ``<repo>/../shared/corpus`` (``thyme/trajectories.jsonl``, its images
under ``thyme/``); exits with status 2 and a message when it is absent. The corpus is repeated
to a few hundred records (unique ids, absolute image paths) in a temporary folder, and each
worker count replays all of it through :func:`thyme.agent.replay.replay` into a fresh results
file, as ``thyme replay --out`` does. Times are wall clock of the whole run, worker start-up
(a spawned interpreter and a warm sandbox each) included.

Prints, side by side: records/s per worker count, the speed-up over one worker, the scaling
efficiency (speed-up / workers), and the hours 500k records would take (the paper's filtered
SFT set) at that rate; then PASS/FAIL for the issue's target (>= 1.7x from 1 to 2 workers on a
2-core machine). Every run's results are also checked to be the same as one worker's.
Timings depend on the machine's load: run it on a quiet machine, twice, and keep both figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
TRAJECTORIES = CORPUS / "thyme" / "trajectories.jsonl"
TARGET_2X = 1.7
PROJECTED_RECORDS = 500_000
sys.path.insert(0, str(REPO / "src"))


def repeat_corpus(out: Path, times: int) -> int:
    """Write the corpus ``times`` over to ``out`` (unique ids, absolute image paths); the count."""
    records = [json.loads(l) for l in TRAJECTORIES.read_text().splitlines() if l.strip()]
    with out.open("w") as f:
        for k in range(times):
            for r in records:
                f.write(json.dumps(dict(r, id=f"{r['id']}-{k}", image=[str(CORPUS / "thyme" / p) for p in r["image"]])) + "\n")
    return times * len(records)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (workers, zygotes, sessions)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_once(records: Path, out: Path, workers: int, batch_size: int) -> tuple[float, float, dict]:
    """Wall seconds, CPU seconds (all processes) and the summary of one replay."""
    from thyme.agent.replay import replay

    c0, t0 = cpu_seconds(), time.perf_counter()
    s = replay(records, out_path=out, workers=workers, batch_size=batch_size)
    return time.perf_counter() - t0, cpu_seconds() - c0, s.to_dict()


def main() -> int:
    from thyme.agent.parallel import usable_cores

    cores = usable_cores()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=30, help="times the 10-record corpus is repeated (default 30: 300 records)")
    ap.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=list(range(1, cores + 1)),
        help=f"worker counts to measure (default 1..{cores}, the usable cores)",
    )
    ap.add_argument("--batch-size", type=int, default=8, help="records per batch in a worker (default 8, as thyme replay)")
    args = ap.parse_args()
    if not TRAJECTORIES.is_file():
        print(f"corpus not found at {TRAJECTORIES}: clone the repository next to shared/corpus", file=sys.stderr)
        return 2
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="thyme-bench-replay-") as tmp:
        records = Path(tmp) / "records.jsonl"
        n = repeat_corpus(records, args.repeat)
        print(
            f"replay of {n} records (the corpus x{args.repeat}), batch size {args.batch_size}, {cores} usable core(s), load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        )
        rows = []
        reference = None
        for w in args.workers:
            secs, cpu, summary = run_once(records, Path(tmp) / f"out-{w}.jsonl", w, args.batch_size)
            same = reference is None or summary == reference
            reference = reference or summary
            rows.append((w, secs, n / secs, same, summary, cpu))
            print(
                f"  {w} worker(s): {secs:.2f} s, {n / secs:.1f} records/s, {cpu / secs:.0%} CPU, {1000 * cpu / n:.0f} ms CPU per record"
                + ("" if same else "  RESULTS DIFFER from the first run"),
                flush=True,
            )
    base = next((r for r in rows if r[0] == 1), rows[0])
    print()
    print(
        f"{'workers':>7} {'seconds':>8} {'records/s':>10} {'speed-up':>9} {'efficiency':>10} {'CPU used':>9} {'500k records':>13}  same results"
    )
    for w, secs, rps, same, _, cpu in rows:
        speed = rps / base[2]
        print(
            f"{w:>7} {secs:>8.2f} {rps:>10.1f} {speed:>8.2f}x {speed / (w / base[0]):>9.0%} {cpu / secs:>8.0%} {PROJECTED_RECORDS / rps / 3600:>11.2f} h  {'yes' if same else 'NO'}"
        )
    per_record = base[5] / n
    print(
        f"\none worker needs {1000 * per_record:.0f} ms of CPU per record (all processes): {cores} core(s) can do at most "
        f"{cores / per_record:.1f} records/s, {cores / per_record / base[2]:.2f}x one worker, when nothing else runs"
    )
    ok = all(r[3] for r in rows) and not rows[0][4].get("failed")
    two = next((r for r in rows if r[0] == 2), None)
    if two is not None and base[0] == 1:
        ratio = two[2] / base[2]
        verdict = "PASS" if ratio >= TARGET_2X else "FAIL"
        print(f"\n{verdict}: 1 -> 2 workers {ratio:.2f}x (target >= {TARGET_2X}x on {cores} core(s))")
        ok = ok and ratio >= TARGET_2X
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (other jobs on the machine lower the figures)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
