"""The report draws an item's target box beside the crops (issue 19) and says whether a crop hit it."""

from __future__ import annotations

import json
import re

from thyme.report import ReportItem, load_items, to_item, write_report

from .test_report import _trajectory

# _trajectory: a 300x200 input whose code crops (10, 10, 90, 70)


def _page(tmp_path, items) -> str:
    out = tmp_path / "r.html"
    write_report(items, out)
    return out.read_text()


def _target_rects(page: str) -> list[tuple[int, int, int, int]]:
    return [
        tuple(int(v) for v in m) for m in re.findall(r'<rect class="target-box" x="(\d+)" y="(\d+)" width="(\d+)" height="(\d+)"', page)
    ]


def test_the_target_box_is_drawn_with_its_label_and_the_crops_coverage(tmp_path):
    hit = ReportItem(trajectory=_trajectory(tmp_path, tid="hit"), target_box=(20, 20, 60, 60))  # inside the crop
    miss = ReportItem(trajectory=_trajectory(tmp_path, tid="miss"), target_box=(200, 100, 280, 180))
    page = _page(tmp_path, [hit, miss])
    assert _target_rects(page) == [(20, 20, 40, 40), (200, 100, 80, 80)]  # x, y, width, height in input pixels
    assert page.count(">target</text>") == 2 and page.count("&#9632; target</b> (dotted)") == 2  # the label and the legend
    assert "target box</b> (20, 20, 60, 60): the best crop covers 100% of it: <b>crop hit</b> (hit from 50%)" in page
    assert "target box</b> (200, 100, 280, 180): the best crop covers 0% of it: <b>crop miss</b>" in page
    assert "cropped (10, 10, 90, 70); covers 100% of the target" in page
    assert "#00a8a8" in page and "#e0218a" in page  # its own colour, not the crops'


def test_without_a_box_nothing_is_drawn_and_a_hostile_box_is_none(tmp_path):
    plain = _page(tmp_path, [ReportItem(trajectory=_trajectory(tmp_path, tid="p"))])
    assert _target_rects(plain) == [] and "target box" not in plain and "<rect" in plain  # the crop still is
    row = {"trajectory": _trajectory(tmp_path, tid="h").to_dict(), "target_box": '"><script>alert(1)</script>'}
    item = to_item(row)
    assert item.target_box is None and "<script>alert" not in _page(tmp_path, [item])


def test_boxes_reach_the_report_from_eval_predictions_and_rl_rollouts(tmp_path):
    t = _trajectory(tmp_path, tid="e").to_dict()
    preds = tmp_path / "predictions.jsonl"
    rows = [
        {"question_id": 1, "benchmark": "vstar", "prediction": "B", "correct": True, "target_box": [20, 20, 60, 60], "trajectory": t},
        {
            "step": 1,
            "id": "p#0",
            "trajectory": t,
            "reward": {"total": 1.0},
            "bbox": [200, 100, 280, 180],
        },  # rollouts.jsonl + a record's bbox
        {"question_id": 2, "prediction": "B", "trajectory": t},
    ]
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_items(preds)
    assert [i.target_box for i in items] == [(20.0, 20.0, 60.0, 60.0), (200.0, 100.0, 280.0, 180.0), None]
    assert len(_target_rects(_page(tmp_path, items))) == 2
    # a replay's rows get the box of their record (--records), joined by id
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"id": "r1", "bbox": [20, 20, 60, 60], "answer_gt": "B"}) + "\n")
    replay = tmp_path / "replay.jsonl"
    replay.write_text(json.dumps({"id": "r1", "trajectory": t}) + "\n")
    (item,) = load_items(replay, records=records)
    assert item.target_box == (20.0, 20.0, 60.0, 60.0)


def test_eval_summary_and_training_curves_show_the_crop_hit_rate(tmp_path):
    from thyme.report import write_summary, write_training

    from .test_pages import _eval_folder, _plots, _rl_folder

    d = _eval_folder(tmp_path, "A")
    m = json.loads((d / "metrics.json").read_text())
    assert "crop hit rate" not in write_summary(d, tmp_path / "s0.html").read_text()  # no boxes, no line
    (d / "metrics.json").write_text(json.dumps({**m, "crop_hit_rate": 0.25, "crop_hit_rate_code": 0.5}))
    page = write_summary(d, tmp_path / "s.html").read_text()
    assert "crop hit rate (a crop covers &gt;= half of the target box)</th><td>25.0%" in page
    assert "crop hit rate, rows that used code</th><td>50.0%" in page

    rl = _rl_folder(tmp_path)
    state = json.loads((rl / "trainer_state.json").read_text())
    plain = write_training(rl, tmp_path / "t0.html").read_text()
    assert "target box" not in plain
    for e in state["log_history"]:
        e["thyme/crop_hit_rate"] = 0.5
    (rl / "trainer_state.json").write_text(json.dumps(state))
    page = write_training(rl, tmp_path / "t.html").read_text()
    assert "Tool use" in _plots(page) and "rollouts whose crop covers at least half of the prompt&#39;s target box" in page
