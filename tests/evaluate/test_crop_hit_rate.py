"""`thyme eval`'s `crop_hit_rate` (issue 19): rows carrying a target box, scripted crops, real replays."""

from __future__ import annotations

import json

from PIL import Image

from thyme.evaluate.runner import EvalConfig, format_metrics, rescore, run_eval

from ..conftest import CORPUS, needs_corpus
from ..scoring.test_crops import REAL_TARGETS
from .test_runner import TRAJ, Scripted, lines

TARGET = [100, 100, 200, 200]
CROPS = {  # question id -> the box the scripted model crops (None: answers without code)
    "1": (50, 50, 250, 250),  # covers the target: hit
    "2": (300, 200, 400, 300),  # elsewhere: miss
    "3": (150, 0, 400, 300),  # exactly half of the target: hit
    "4": None,  # no code: counts in crop_hit_rate, not in crop_hit_rate_code
    "5": (50, 50, 250, 250),  # a hit, but the row has no box: not counted
}


def _bench(tmp_path, *, boxes=True):
    Image.new("RGB", (400, 300), "white").save(tmp_path / "in.png")
    rows = []
    for qid in CROPS:
        row = {
            "question_id": qid,
            "image": "in.png",
            "question": f"q{qid}",
            "options": "(A) yes\n(B) no",
            "answer": "A",
            "category": "direct_attributes",
        }
        if boxes and qid != "5":
            row["bbox"] = TARGET if qid != "3" else "[100, 100, 200, 200]"  # a list, or its text form
        rows.append(row)
    p = tmp_path / "vstar.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _script(r):
    qid = r.key.split("#")[0].rsplit("/", 1)[-1]
    box = CROPS[qid]
    if r.round == 0 and box is not None:
        return f"<think>Zoom.\n<code>\n```python\nfrom PIL import Image\nimg = Image.open(image_path)\nimg.crop({box!r}).save('/mnt/data/temp_processed_images/c.png')\nprint('ok')\n```\n</code>"
    return "</think>\n<answer>A</answer>"


def test_eval_reports_crop_hit_rate_over_rows_with_a_box(tmp_path):
    data = _bench(tmp_path)
    res = run_eval(
        EvalConfig(benchmark="vstar", data=str(data), out=str(tmp_path / "o"), report=False), backend_factory=lambda: Scripted(_script)
    )
    preds = {str(p["question_id"]): p for p in lines(tmp_path / "o" / "predictions.jsonl")}
    assert {q: (p.get("crop_hit") or {}).get("hit") for q, p in preds.items()} == {"1": True, "2": False, "3": True, "4": False, "5": None}
    assert preds["3"]["crop_hit"] == {"crops": [[150, 0, 400, 300]], "coverage": 0.5, "hit": True}
    assert preds["1"]["target_box"] == [100.0, 100.0, 200.0, 200.0] and preds["1"]["image_size"] == [400, 300]
    assert "crop_hit" not in preds["5"] and "target_box" not in preds["5"]
    m = res.metrics
    assert m["crop_hit_rate"] == 0.5  # 2 hits / 4 rows with a box
    assert m["crop_hit_rate_code"] == round(2 / 3, 6)  # over the 3 of them that ran code
    assert m["crop_hit"] == {"rows_with_box": 4, "hits": 2, "rows_with_box_and_code": 3}
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["crop_hit_rate"] == 0.5
    assert "crop hit rate: 0.5000 (2/4 rows with a target box); over those that used code: 0.6667 (2/3)" in format_metrics(m)
    # rescoring the saved predictions (no images read) gives the same numbers
    again = rescore("vstar", data, tmp_path / "o" / "predictions.jsonl")
    assert again["crop_hit"] == m["crop_hit"] and again["crop_hit_rate_code"] == m["crop_hit_rate_code"]


def test_eval_without_boxes_reports_no_crop_hit_rate(tmp_path):
    data = _bench(tmp_path, boxes=False)
    res = run_eval(
        EvalConfig(benchmark="vstar", data=str(data), out=str(tmp_path / "o"), report=False), backend_factory=lambda: Scripted(_script)
    )
    assert res.metrics["tool_use_rate"] == 0.8
    assert not any(k.startswith("crop_hit") for k in res.metrics) and "crop hit" not in format_metrics(res.metrics)
    assert not any("crop_hit" in p for p in lines(tmp_path / "o" / "predictions.jsonl"))


def test_a_malformed_box_is_no_box_and_fails_nothing(tmp_path):
    data = _bench(tmp_path)
    rows = [json.loads(l) for l in data.read_text().splitlines()]
    rows[0]["bbox"] = [200, 200, 100, 100]  # inverted
    rows[1]["bbox"] = "not a box"
    rows[2]["bbox"] = [True, 0, 1, 1]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_eval(
        EvalConfig(benchmark="vstar", data=str(data), out=str(tmp_path / "o"), report=False), backend_factory=lambda: Scripted(_script)
    )
    assert res.metrics["counts"]["failed"] == 0 and res.metrics["crop_hit"] == {"rows_with_box": 1, "hits": 0, "rows_with_box_and_code": 0}


@needs_corpus
def test_replayed_real_trajectories_on_hand_annotated_hrbench_boxes(tmp_path):
    """The corpus's HR-Bench 4K rows with the boxes of ``tests/scoring/test_crops.py`` (annotated
    by hand for these tests; HR-Bench ships none), the real Thyme-7B trajectories replayed."""
    by_qid = {"179": REAL_TARGETS["thyme-case-1"][0], "224": REAL_TARGETS["thyme-case-2"][0], "243": REAL_TARGETS["thyme-case-9"][0]}
    rows = [json.loads(l) for l in (CORPUS / "benchmarks/samples/hrbench4k.jsonl").read_text().splitlines() if l.strip()]
    for r in rows:
        r["bbox"] = list(by_qid[str(r["question_id"])])
    data = tmp_path / "hrbench4k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = EvalConfig(
        benchmark="hrbench4k",
        data=str(data),
        images_root=str(CORPUS / "benchmarks/samples/.."),
        out=str(tmp_path / "o"),
        replay=str(TRAJ),
        report=False,
    )
    res = run_eval(cfg)
    preds = {str(p["question_id"]): p for p in lines(tmp_path / "o" / "predictions.jsonl")}
    assert {q: p["crop_hit"]["hit"] for q, p in preds.items()} == {"179": True, "224": True, "243": False}
    assert preds["179"]["image_size"] == [2419, 4032] and preds["179"]["crop_hit"]["crops"] == [[1550, 2650, 1850, 2750]]
    assert res.metrics["crop_hit_rate"] == round(2 / 3, 6) and res.metrics["crop_hit_rate_code"] == round(2 / 3, 6)


def test_a_tsv_bbox_column_reaches_the_predictions(tmp_path):
    Image.new("RGB", (400, 300), "white").save(tmp_path / "in.png")
    header = "index\tquestion\tA\tB\tanswer\tcategory\timage_path\tbbox\n"
    body = "".join(f"{q}\tq{q}\tyes\tno\tA\tdirect_attributes\tin.png\t{'[100, 100, 200, 200]' if q != '5' else ''}\n" for q in CROPS)
    data = tmp_path / "vstar.tsv"
    data.write_text(header + body)
    res = run_eval(
        EvalConfig(benchmark="vstar", data=str(data), out=str(tmp_path / "o"), report=False), backend_factory=lambda: Scripted(_script)
    )
    assert res.metrics["crop_hit"] == {"rows_with_box": 4, "hits": 2, "rows_with_box_and_code": 3}
