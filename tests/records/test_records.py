"""The one Thyme record (:mod:`thyme.records`): parsing and writing round trips on the real corpus,
and a record built from a replayed trajectory reads back as the same record."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from thyme import protocol
from thyme.errors import RecordError
from thyme.records import Record, iter_records, parse_record, record_from_trajectory, record_to_dict, write_records

from ..conftest import CORPUS, corpus_records, needs_corpus

TRAJ = CORPUS / "thyme" / "trajectories.jsonl"


@needs_corpus
def test_every_corpus_record_parses_with_its_images_split_into_inputs_and_outputs():
    parsed = list(iter_records(TRAJ))  # root: the records file's folder
    assert len(parsed) == len(corpus_records()) == 10
    for (n, rec), raw in zip(parsed, corpus_records()):
        assert isinstance(rec, Record), rec
        assert rec.id == raw["id"] and rec.line == n and rec.raw == raw
        assert rec.inputs + rec.outputs == [os.path.realpath(CORPUS / "thyme" / p) for p in raw["image"]]
        assert len(rec.outputs) == sum(sp.images for sp in rec.spans)
        assert rec.prompt == protocol.strip_question_placeholder(raw["question"])
        assert all(os.path.isfile(p) for p in rec.inputs + rec.outputs)


@needs_corpus
def test_write_then_parse_is_the_identity_on_the_corpus(tmp_path):
    recs = [rec for _, rec in iter_records(TRAJ)]
    for rec, raw in zip(recs, corpus_records()):
        d = record_to_dict(rec, root=CORPUS / "thyme")
        assert d == raw  # relative paths come back as the file wrote them, every field kept
    # written elsewhere: the images are outside the new folder, so the paths are absolute and
    # reading them back needs the images' folder as root (or the opt-in)
    out = write_records(recs, tmp_path / "copy.jsonl")
    again = list(iter_records(out, root=CORPUS / "thyme"))
    assert [(r.id, r.inputs, r.outputs, r.question, r.response) for _, r in again] == [(r.id, r.inputs, r.outputs, r.question, r.response) for r in recs]
    refused = [e for _, e in iter_records(out) if isinstance(e, RecordError)]
    assert len(refused) == sum(1 for r in recs if r.inputs or r.outputs)  # text-only records have no path


def test_malformed_records_name_the_line_and_the_field(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join([
        "{oops",
        json.dumps({"question": "q"}),
        json.dumps({"image": ["a.png"], "question": "<image>\nq", "response": "<sandbox_output><image></sandbox_output>"}),
        json.dumps({"image": [], "question": "q", "response": "<code>x</code><sandbox_output>1"}),
        json.dumps({"image": [], "question": "q", "response": "<answer>1</answer>"}),
    ]) + "\n")
    out = list(iter_records(f))
    assert [n for n, _ in out] == [1, 2, 3, 4, 5]
    assert "invalid JSON" in str(out[0][1]) and "line 1" in str(out[0][1])
    assert "'response'" in str(out[1][1]) and "line 2" in str(out[1][1])
    assert "1 image(s) listed" in str(out[2][1]) and "line 3" in str(out[2][1])
    assert "never closed" in str(out[3][1])
    assert isinstance(out[4][1], Record) and out[4][1].id == "line-5"
    # replay's reading: counts not checked, the inputs must exist
    with pytest.raises(RecordError, match="image not found"):
        parse_record({"image": ["a.png"], "question": "<image>\nq", "response": "r"}, root=tmp_path, check_counts=False, check_files="inputs")


def test_a_trajectory_becomes_a_record_that_parses_back(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(tmp_path / "in.png")
    Image.new("RGB", (20, 10), "blue").save(tmp_path / "crop.png")
    code_text = "<think>Crop.\n<code>\n```python\nprint(1)\n```\n</code>"
    feedback = [protocol.text_part("\n" + protocol.OUTPUT_START), protocol.image_part(str(tmp_path / "crop.png")), protocol.text_part(protocol.OUTPUT_END + "\n")]
    turns = [
        SimpleNamespace(text=code_text, code="print(1)", execution={"ok": True, "images": [str(tmp_path / "crop.png")], "stdout": ""}, feedback=feedback),
        SimpleNamespace(text="Blue.</think>\n<answer>B</answer>", code=None, execution=None, feedback=[]),
    ]
    traj = SimpleNamespace(id="t1", question="What colour?", images=[str(tmp_path / "in.png")], turns=turns, prefill="", answer="B", meta={"benchmark": "vstar", "question_id": 7})
    d = record_from_trajectory(traj, root=tmp_path)
    assert d["image"] == ["in.png", "crop.png"] and d["question"] == "<image>\nWhat colour?"
    assert d["response"] == code_text + "\n<sandbox_output><image></sandbox_output>\nBlue.</think>\n<answer>B</answer>"
    assert d["reference_outputs"] == [[{"image": "crop.png", "size": [20, 10]}]]
    assert (d["model_answer"], d["benchmark"], d["question_id"]) == ("B", "vstar", 7)
    rec = parse_record(d, root=tmp_path)  # the image counts match the placeholders
    assert rec.inputs == [os.path.realpath(tmp_path / "in.png")] and rec.outputs == [os.path.realpath(tmp_path / "crop.png")]


@needs_corpus
def test_a_replayed_corpus_trajectory_gives_back_its_record(tmp_path):
    from thyme.agent import AgentConfig, Trajectory
    from thyme.agent.replay import replay

    ids = {"thyme-case-1", "thyme-case-7"}  # an image output; a text-only question
    f = tmp_path / "two.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in corpus_records() if r["id"] in ids))
    rows = []
    replay(f, images_root=CORPUS / "thyme", out_path=tmp_path / "res.jsonl", config=AgentConfig(), on_row=rows.append)
    originals = {r["id"]: r for r in corpus_records()}
    assert {r["id"] for r in rows} == ids
    for row in rows:
        assert row["response_match"], row["id"]
        traj = Trajectory.from_dict(row["trajectory"])
        d = record_from_trajectory(traj, question=originals[row["id"]]["question"])
        assert d["response"] == originals[row["id"]]["response"]
        rec = parse_record(d, allow_absolute=True)
        assert len(rec.inputs) == len(originals[row["id"]]["image"][:1]) and len(rec.outputs) == len(originals[row["id"]]["image"]) - len(rec.inputs)
