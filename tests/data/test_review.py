"""``thyme data review`` without a server: the export's tasks and labeling config, the agreement
rule, and the import of hostile or mismatched exports (the live round trip:
``test_review_labelstudio.py``)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from thyme.data.review import (
    DISAGREEMENT,
    LABEL_CONFIG,
    REJECT_REASONS,
    ReviewConfig,
    Vote,
    apply_review,
    decide,
    export_review,
    fingerprint,
    parse_annotation,
)
from thyme.errors import RecordError, ThymeError

from ..conftest import CORPUS, needs_corpus

RESPONSE = (
    "<think>zoom in</think><code>\n```python\nprint('x')\n```\n</code>\n<sandbox_output>first<image>then<image></sandbox_output>"
    "<think>now clear</think><answer>B</answer>"
)


def _records(tmp: Path, n: int = 3) -> Path:
    Image.new("RGB", (40, 30), (250, 0, 0)).save(tmp / "in.png")
    Image.new("RGB", (10, 10), (0, 250, 0)).save(tmp / "o1.png")
    Image.new("RGB", (12, 8), (0, 0, 250)).save(tmp / "o2.jpg")
    recs = [
        {"id": f"r{i}", "image": ["in.png", "o1.png", "o2.jpg"], "question": f"<image>\nWhich one? {i}", "response": RESPONSE, "extra": i}
        for i in range(n)
    ]
    p = tmp / "kept.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return p


def _tasks(folder: Path) -> list:
    return json.loads((folder / "tasks.json").read_text(encoding="utf-8"))


def _task(rec_line: int, records: Path, *anns: dict, tid: int = 1) -> dict:
    obj = json.loads(records.read_text(encoding="utf-8").splitlines()[rec_line - 1])
    return {
        "id": tid,
        "data": {"thyme_line": rec_line, "thyme_id": obj["id"], "thyme_sha256": fingerprint(obj["question"], obj["response"])},
        "annotations": list(anns),
    }


def _ann(who, decision: str, reason: str | None = None, note: str | None = None, aid: int = 1, **kw) -> dict:
    res = [{"from_name": "decision", "to_name": "question", "type": "choices", "value": {"choices": [decision]}}]
    if reason:
        res.append({"from_name": "reason", "to_name": "question", "type": "choices", "value": {"choices": [reason]}})
    if note:
        res.append({"from_name": "note", "to_name": "question", "type": "textarea", "value": {"text": [note]}})
    return {"id": aid, "completed_by": who, "result": res, **kw}


# --------------------------------------------------------------------------- export


def test_export_writes_tasks_with_every_image_and_the_config(tmp_path):
    records = _records(tmp_path, 2)
    s = export_review(records, tmp_path / "out")
    tasks = _tasks(tmp_path / "out")
    assert (s.records, s.tasks, s.failed, s.images) == (2, 2, 0, 6)
    seen = []
    assert export_review(records, tmp_path / "again", on_task=seen.append).tasks == 2
    assert seen == tasks == _tasks(tmp_path / "again")
    assert export_review(tmp_path / "in.png", tmp_path / "none").tasks == 0 and _tasks(tmp_path / "none") == []  # not records
    d = tasks[0]["data"]
    assert d["question"] == "Which one? 0"
    assert d["answer"] == "B"
    assert d["thyme_id"] == "r0" and d["thyme_line"] == 1 and len(d["thyme_sha256"]) == 64
    # images: input then outputs, in order, as data URLs with the right type and bytes
    assert [u.split(";")[0] for u in d["images"]] == ["data:image/png", "data:image/png", "data:image/jpeg"]
    assert base64.b64decode(d["images"][2].split(",", 1)[1]) == (tmp_path / "o2.jpg").read_bytes()
    assert "<sandbox_output>first[image 2]then[image 3]</sandbox_output>" in d["response"]
    assert "<code>" in d["response"] and "now clear" in d["response"]


def test_labeling_config_is_valid_xml_naming_every_task_field():
    root = ET.fromstring(LABEL_CONFIG)
    values = {e.get("value") or e.get("valueList") for e in root.iter() if e.tag in ("Text", "Image")}
    assert values == {"$question", "$images", "$response", "$answer"}
    choices = {c.get("name"): [x.get("value") for x in c] for c in root.iter("Choices")}
    assert choices["decision"] == ["accept", "reject"]
    assert choices["reason"] == list(REJECT_REASONS)
    assert [t.get("name") for t in root.iter("TextArea")] == ["note"]


def test_export_local_files_mode_and_bad_records_listed(tmp_path):
    records = _records(tmp_path, 1)
    with records.open("a") as f:
        f.write('{"id": "bad", "image": ["../../etc/passwd"], "question": "<image>\\nq", "response": "<answer>a</answer>"}\n')
        f.write("not json\n")
    s = export_review(records, tmp_path / "out", ReviewConfig(image_mode="local-files"))
    tasks = _tasks(tmp_path / "out")
    assert (s.records, s.tasks, s.failed) == (3, 1, 2)
    assert tasks[0]["data"]["images"] == ["/data/local-files/?d=in.png", "/data/local-files/?d=o1.png", "/data/local-files/?d=o2.jpg"]
    assert s.images_folder == str(tmp_path.resolve())
    assert any("climbs out" in e["error"] for e in s.errors)  # the path rule of thyme.records


def test_export_refuses_a_non_image_and_an_image_over_the_cap(tmp_path):
    records = _records(tmp_path, 1)
    (tmp_path / "o1.png").write_bytes(b"not an image at all")
    s = export_review(records, tmp_path / "out")
    assert s.failed == 1 and "o1.png" in s.errors[0]["error"]
    (tmp_path / "o1.png").write_bytes((tmp_path / "o2.jpg").read_bytes())
    s = export_review(records, tmp_path / "out2", ReviewConfig(max_image_mb=1e-6))
    assert s.failed == 1 and "max-image-mb" in s.errors[0]["error"]


@needs_corpus
def test_export_corpus_records(tmp_path):
    s = export_review(CORPUS / "thyme" / "trajectories.jsonl", tmp_path)
    tasks = _tasks(tmp_path)
    assert s.failed == 0 and s.tasks == s.records >= 5
    raw = [json.loads(l) for l in (CORPUS / "thyme" / "trajectories.jsonl").read_text().splitlines() if l.strip()]
    assert [len(t["data"]["images"]) for t in tasks] == [len(r["image"]) for r in raw]  # a text-only record has none
    assert all(t["data"]["answer"] != "(no <answer>)" for t in tasks)


@needs_corpus
def test_accepted_corpus_records_pass_thyme_data_verify(tmp_path):
    src = CORPUS / "thyme" / "trajectories.jsonl"
    kept = tmp_path / "kept.jsonl"
    kept.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:3]), encoding="utf-8")
    export_review(kept, tmp_path / "ls", images_root=CORPUS / "thyme")
    tasks = _tasks(tmp_path / "ls")
    for t, d in zip(tasks, ("accept", "accept", "reject")):
        t["annotations"] = [_ann(1, d, "other" if d == "reject" else None)]
    s = apply_review(json.dumps(tasks).encode(), kept, tmp_path / "kept.accepted.jsonl")
    assert (s.accepted, s.rejected) == (2, 1)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "thyme.cli",
            "data",
            "verify",
            str(tmp_path / "kept.accepted.jsonl"),
            "--images-root",
            str(CORPUS / "thyme"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["kept"] == 2


# --------------------------------------------------------------------------- the agreement rule


def test_rule_unanimous_accept_reject_disagreement_and_pending():
    a = decide([Vote("u1", "accept"), Vote("u2", "accept")])
    assert a.status == "accepted"
    r = decide([Vote("u1", "reject", "wrong answer"), Vote("u2", "reject", "other")])
    assert (r.status, r.reason) == ("rejected", "other; wrong answer")
    d = decide([Vote("u1", "accept"), Vote("u2", "reject", "other")])
    assert (d.status, d.reason, d.disagreement) == ("rejected", DISAGREEMENT, True)
    assert decide([]).status == "pending"
    assert decide([Vote("u1", "accept")], min_annotators=2).status == "pending"
    assert decide([Vote("u1", "accept"), Vote("u2", "accept")], min_annotators=2).status == "accepted"


def test_rule_latest_annotation_per_annotator_counts():
    votes = [Vote("u1", "reject", "other", annotation_id=5), Vote("u1", "accept", annotation_id=9), Vote("u2", "accept", annotation_id=7)]
    d = decide(votes, min_annotators=2)
    assert d.status == "accepted" and len(d.votes) == 2
    assert decide([Vote("u1", "accept", annotation_id=9), Vote("u1", "reject", annotation_id=3)]).status == "accepted"


def test_parse_annotation_shapes():
    v = parse_annotation(_ann({"id": 3, "email": "a@b"}, "reject", "wrong answer", "see the plate"), 7)
    assert (v.annotator, v.decision, v.reason, v.note, v.task_id) == ("a@b", "reject", "wrong answer", "see the plate", 7)
    assert parse_annotation(_ann(2, "accept", "other"), None).reason == ""  # a reason only counts with reject
    assert parse_annotation({"id": 1, "completed_by": 2, "result": [], "was_cancelled": True}, 1) is None
    with pytest.raises(RecordError, match="no 'accept' or 'reject'"):
        parse_annotation({"id": 1, "completed_by": 2, "result": []}, 1)
    with pytest.raises(RecordError, match="no annotator"):
        parse_annotation(_ann(None, "accept"), 1)
    assert len(parse_annotation(_ann(1, "reject", "x" * 10_000, "y" * 100_000), 1).note) <= 4000
    # no terminal escape sequences from the export reach the printed summary
    v = parse_annotation(_ann("evil\x1b]0;pwned\x07\x1b[2J", "reject", "wrong\x1b[31m answer\n", "line 1\nline\x9b2"), 1)
    assert (v.annotator, v.reason, v.note) == ("evil]0;pwned[2J", "wrong[31m answer", "line 1\nline2")


# --------------------------------------------------------------------------- import


def test_import_splits_records_and_keeps_them_unchanged(tmp_path):
    records = _records(tmp_path, 4)
    export = [
        _task(1, records, _ann(1, "accept", aid=1), _ann(2, "accept", aid=2), tid=11),
        _task(2, records, _ann(1, "reject", "wrong answer", "off by one", aid=3), _ann(2, "reject", "wrong answer", aid=4), tid=12),
        _task(3, records, _ann(1, "accept", aid=5), _ann(2, "reject", "other", aid=6), tid=13),
    ]  # record 4 has no task: not in the export
    (tmp_path / "export.json").write_text(json.dumps(export))
    s = apply_review(tmp_path / "export.json", records, tmp_path / "acc.jsonl", tmp_path / "rej.jsonl")
    assert (s.tasks, s.records, s.reviewed, s.accepted, s.rejected, s.pending, s.not_in_export) == (3, 4, 3, 1, 2, 0, 1)
    assert (tmp_path / "acc.jsonl").read_text().splitlines() == [json.dumps(json.loads(records.read_text().splitlines()[0]))]
    rej = [json.loads(l) for l in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rej] == ["r1", "r2"]
    assert rej[0]["rejection"] == {"stage": "review", "reason": "wrong answer", "detail": "1: off by one"}
    assert rej[1]["rejection"]["reason"] == DISAGREEMENT
    assert {k: v for k, v in rej[0].items() if k not in ("rejection", "review")} == json.loads(records.read_text().splitlines()[1])
    assert [d["id"] for d in s.disagreements] == ["r2"] and s.reasons == {"wrong answer": 1, DISAGREEMENT: 1}


def test_import_finds_a_moved_record_by_its_digest_and_refuses_a_foreign_task(tmp_path):
    records = _records(tmp_path, 3)
    t = _task(1, records, _ann(1, "accept"))
    t["data"]["thyme_line"] = 3  # the file was re-ordered: line 3 holds another record
    foreign = _task(2, records, _ann(1, "accept"), tid=99)
    foreign["data"]["thyme_sha256"] = "0" * 64
    s = apply_review(json.dumps([t, foreign]).encode(), records, tmp_path / "acc.jsonl")
    assert s.accepted == 1 and json.loads((tmp_path / "acc.jsonl").read_text())["id"] == "r0"
    assert s.bad_tasks == 1 and s.errors[0]["task"] == 99 and "no record" in s.errors[0]["error"]
    assert (tmp_path / "acc.rejected.jsonl").exists()


def test_import_of_a_hostile_export_reports_each_bad_task(tmp_path):
    records = _records(tmp_path, 2)
    good = _task(1, records, _ann(1, "accept"), tid=1)
    export = [
        "a string",
        {"id": 2, "data": "nope"},
        {"id": 3, "data": {"thyme_sha256": "short"}},
        dict(_task(2, records, tid=4), annotations="many"),
        _task(2, records, {"id": "\x1b[2J", "completed_by": None, "result": "x"}, [1, 2], _ann(True, "accept"), tid=5),
        good,
    ]
    s = apply_review(json.dumps(export).encode(), records, tmp_path / "acc.jsonl")
    assert (s.tasks, s.bad_tasks, s.accepted, s.pending) == (6, 4, 1, 1)
    assert len(s.errors) == 7
    assert not any("\x1b" in e["error"] for e in s.errors)
    # deep nesting and a non-list document: one clear error, no traceback
    with pytest.raises(ThymeError, match="deep|depth"):
        apply_review(("[" * 100_000).encode(), records, tmp_path / "acc.jsonl")
    with pytest.raises(ThymeError, match="not a list of tasks"):
        apply_review(b'{"tasks": []}', records, tmp_path / "acc.jsonl")
    with pytest.raises(ThymeError, match="invalid JSON|not valid"):
        apply_review(b"[{", records, tmp_path / "acc.jsonl")
    big = tmp_path / "big.json"
    big.write_bytes(b"[" + b" " * (2 << 20) + b"]")
    with pytest.raises(ThymeError, match="max-export-mb"):
        apply_review(big, records, tmp_path / "acc.jsonl", cfg=ReviewConfig(max_export_mb=1))


def test_cli_export_then_import(tmp_path):
    records = _records(tmp_path, 2)
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "thyme.cli", "data", "review", *a, "--json"], capture_output=True, text=True, timeout=120
    )
    p = run("export", str(records), "--out", str(tmp_path / "ls"))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["tasks"] == 2
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    tasks[0]["annotations"] = [_ann(1, "accept")]
    tasks[1]["annotations"] = [_ann(1, "reject", "other")]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    p = run("import", str(tmp_path / "export.json"), "--records", str(records))
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert (s["accepted"], s["rejected"]) == (1, 1)
    assert Path(s["accepted_path"]) == tmp_path / "kept.accepted.jsonl"
    assert Path(s["rejected_path"]) == tmp_path / "kept.accepted.rejected.jsonl"
    p = run("import", str(tmp_path / "missing.json"), "--records", str(records))
    assert p.returncode == 2 and "cannot read" in p.stderr


def test_unwritable_outputs_are_refused_before_any_work(tmp_path):
    records = _records(tmp_path, 1)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ThymeError, match="cannot write --out"):
        export_review(records, tmp_path / "afile")
    with pytest.raises(ThymeError, match="cannot write --out"):  # before the (invalid) export is read
        apply_review(b"not json", records, tmp_path / "afile" / "acc.jsonl")
    with pytest.raises(ThymeError, match="records file not found"):
        apply_review(b"[]", tmp_path / "missing.jsonl", tmp_path / "acc.jsonl")
