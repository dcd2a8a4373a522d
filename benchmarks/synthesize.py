"""``thyme data synthesize`` throughput with the instant scripted teacher: our side of the pipeline.

For each scenario, ``--rows`` seed rows on real corpus images (the Thyme case inputs and the V*
image; boxes from Thyme's own crops of them) run through the whole pipeline with the scripted
teacher (:mod:`thyme.testing.teacher`, in-process, answering at once) and one sandbox, at
``--concurrency`` (default 1: the figures are per core). Printed per scenario: rows/s, seconds
per row in each stage (``teacher`` is HTTP round trips to the instant teacher, ``execute`` the
sandbox, ``goal`` the pixel checks, ``consistency`` the verifier call), and the share of the
row's time spent in the sandbox; then the hours the paper's pool of 4M seed rows would take per
core and on ``--machines`` machines of ``--cores`` cores (our side only: a real teacher's
generation time comes on top and usually dominates; scale it by your teacher's throughput).

    PYTHONPATH=src python benchmarks/synthesize.py [--rows 3] [--concurrency 1] [--machines 8] [--cores 32] [--json]

Needs the corpus (``../shared/corpus``). About a minute of CPU on a laptop core.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = (REPO.parent / "shared" / "corpus").resolve()
POOL = 4_000_000

ROWS = {  # (image under the corpus, question, answer, bbox)
    "crop": [
        ("thyme/images/case1-1.jpg", "What street is indicated by the sign?", "MICHIGAN", [1550, 2650, 1850, 2750]),
        ("thyme/images/case4-1.jpg", "What is the plate number of the blue car?", "S OT 911", [1250, 1030, 1360, 1070]),
        ("thyme/images/case9-1.jpg", "What is the model number of the train?", "4005", [1600, 1900, 1900, 2200]),
    ],
}
ROWS["multi_round"] = ROWS["crop"]
ROWS["rotate"] = ROWS["contrast"] = ROWS["no_code"] = [
    ("thyme/images/case8-1.jpg", "Which machinery has the highest occupancy rate?", "A", None),
    ("benchmarks/images/sa_46221.jpg", "Is the red balloon above or below the white balloon?", "below", None),
    ("thyme/images/case6-1.jpg", "What is written in the image?", "communities", None),
]
ROWS["compute"] = [(None, "Compute 3.5 times 2 and 1 plus 0.25.", "7.0, 1.25", None)] * 3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=3, help="rows per scenario (cycling through the seed images)")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--machines", type=int, default=8)
    ap.add_argument("--cores", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if not (CORPUS / "thyme/images").is_dir():
        print(f"corpus not found at {CORPUS}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO / "src"))
    from thyme.data.synthesize import STAGES, SynthConfig, TeacherClient, TeacherConfig, synthesize
    from thyme.sandbox import Sandbox
    from thyme.testing.teacher import running_teacher

    results = {}
    with running_teacher() as (url, _), Sandbox() as sandbox, tempfile.TemporaryDirectory() as tmp:
        teacher = TeacherClient(TeacherConfig(base_url=url, model="scripted", max_retries=0))
        for scen, pool in ROWS.items():
            d = Path(tmp) / scen
            d.mkdir()
            seeds = d / "seeds.jsonl"
            with seeds.open("w") as f:
                for k in range(a.rows):
                    img, q, ans, box = pool[k % len(pool)]
                    row = {"id": f"{scen}-{k}", "question": q, "answer": ans}
                    if img:
                        row["image"] = img
                    if box:
                        row["bbox"] = box
                    f.write(json.dumps(row) + "\n")
            t0 = time.perf_counter()
            s = synthesize(
                seeds,
                d / "out.jsonl",
                teacher=teacher,
                sandbox=sandbox,
                images_root=CORPUS,
                config=SynthConfig(scenario=scen, concurrency=a.concurrency),
            )
            wall = time.perf_counter() - t0
            stage = {k: 0.0 for k in STAGES}
            for p in (d / "out.jsonl", d / "out.rejected.jsonl"):
                if p.exists():
                    for line in p.read_text().splitlines():
                        for k, v in (json.loads(line).get("synthesis") or {}).get("stage_s", {}).items():
                            stage[k] = stage.get(k, 0.0) + v
            n = max(1, s.rows)
            per = {k: round(v / n, 4) for k, v in stage.items() if v}
            results[scen] = {
                "rows": s.rows,
                "kept": s.kept,
                "wall_s": round(wall, 3),
                "rows_per_s": round(s.rows / wall, 4),
                "stage_s_per_row": per,
                "sandbox_share": round(stage.get("execute", 0.0) / max(1e-9, wall * a.concurrency), 3),
            }
    # an even mix of the six scenarios: the mean time per row (not the mean rate, which no_code would dominate)
    mean_s = sum(r["wall_s"] / max(1, r["rows"]) for r in results.values()) / len(results)
    mean_rate = 1.0 / mean_s
    per_core_h = POOL * mean_s * a.concurrency / 3600  # measured at this concurrency in one process
    summary = {
        "scenarios": results,
        "mean_rows_per_s": round(mean_rate, 4),
        "pool_rows": POOL,
        "hours_per_core": round(per_core_h, 1),
        "machines": a.machines,
        "cores": a.cores,
        "hours_on_machines": round(per_core_h / (a.machines * a.cores), 2),
    }
    if a.json:
        print(json.dumps(summary))
        return 0
    print(f"{'scenario':<12}{'rows':>5}{'kept':>5}{'rows/s':>9}{'sandbox':>9}  seconds per row by stage")
    for scen, r in results.items():
        stages = ", ".join(f"{k} {v:.3f}" for k, v in r["stage_s_per_row"].items())
        print(f"{scen:<12}{r['rows']:>5}{r['kept']:>5}{r['rows_per_s']:>9.3f}{r['sandbox_share']:>8.0%}  {stages}")
    print(
        f"even mix: {mean_rate:.3f} rows/s at concurrency {a.concurrency}; {POOL:,} seed rows: {per_core_h:,.0f} core-hours, "
        f"{summary['hours_on_machines']:,.1f} h on {a.machines} machines x {a.cores} cores "
        "(our side only; add the teacher's generation time)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
