"""Benchmark data forms (VLMEvalKit TSV, official JSON/JSONL/parquet, corpus JSONL), images and prompts.

The TSV / parquet / JSON fixtures are written here from the column names VLMEvalKit's dataset
classes and the benchmarks' official files use, with images made by PIL.
"""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
from PIL import Image

from thyme.evaluate.benchmarks import (
    BenchmarkDataError,
    MissingImagesError,
    check_images,
    get_benchmark,
    load_rows,
    materialise_images,
    parse_options,
)
from thyme.evaluate.prompts import build_question

from ..conftest import CORPUS, corpus_records, needs_corpus


def image_bytes(size, color="red", fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def b64(size, color="red", fmt="JPEG") -> str:
    return base64.b64encode(image_bytes(size, color, fmt)).decode()


def write_tsv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")  # what pandas' to_csv(sep="\t") writes: minimal quoting
        w.writerow(header)
        for r in rows:
            w.writerow([r.get(h, "") for h in header])
    return path


def hrbench_tsv(path):
    """HR-Bench as VLMEvalKit's HRBenchDataset reads it: index, question, A-D, answer, category,
    cycle_category, image (base64, or the index of the row whose image it shares)."""
    header = ["index", "question", "A", "B", "C", "D", "answer", "category", "cycle_category", "image"]
    q = "What is written on the sign?"
    rows = [
        {"index": 0, "question": q, "A": "27B", "B": "37B", "C": "27D", "D": "27E", "answer": "A", "category": "single", "cycle_category": "0", "image": b64((64, 48), "red")},
        {"index": 1, "question": q, "A": "27E", "B": "27B", "C": "37B", "D": "27D", "answer": "B", "category": "single", "cycle_category": "1", "image": "0"},
        {"index": 2, "question": "Which car is closer?", "A": "left", "B": "right", "C": "same", "D": "none", "answer": "C", "category": "cross", "cycle_category": "0", "image": b64((80, 40), "blue", "PNG")},
        {"index": 3, "question": "Which car is closer?", "A": "none", "B": "left", "C": "right", "D": "same", "answer": "D", "category": "cross", "cycle_category": "1", "image": "2"},
    ]
    return write_tsv(path, header, rows)


# --------------------------------------------------------------------------- names


def test_benchmark_names_and_aliases():
    assert [get_benchmark(n).name for n in ("vstar", "hrbench4k", "hrbench8k", "mme-realworld", "mme-realworld-lite")] == ["vstar", "hrbench4k", "hrbench8k", "mme-realworld", "mme-realworld-lite"]
    assert get_benchmark("HRBench4K").name == "hrbench4k" and get_benchmark("MME-RealWorld-Lite").name == "mme-realworld-lite"
    assert get_benchmark("VStarBench").name == "vstar" and get_benchmark("MME_RealWorld").name == "mme-realworld"
    with pytest.raises(BenchmarkDataError, match="known benchmarks: vstar, hrbench4k"):
        get_benchmark("mmbench")


@pytest.mark.parametrize(
    "value, expected",
    [
        ("(A) rubber\n(B) cotton", {"A": "rubber", "B": "cotton"}),
        ("A.MACHIGAN\nB.MACHLGUN", {"A": "MACHIGAN", "B": "MACHLGUN"}),
        ("A. 206 441 5000\nB. 206 451 5000", {"A": "206 441 5000", "B": "206 451 5000"}),
        ("The choices are listed below:\n(A) x\n(B) y", {"A": "x", "B": "y"}),
        ("['(A) 13', '(B) 90', '(C) the image does not feature it']", {"A": "13", "B": "90", "C": "the image does not feature it"}),
        (["(A) red", "(B) green"], {"A": "red", "B": "green"}),
        ("(A) first line\ncontinued\n(B) y", {"A": "first line\ncontinued", "B": "y"}),
    ],
)
def test_option_forms(value, expected):
    assert parse_options(value) == expected


# --------------------------------------------------------------------------- VLMEvalKit TSV


def test_hrbench_tsv_rows_cycles_and_base64_images(tmp_path):
    tsv = hrbench_tsv(tmp_path / "hr_bench_4k.tsv")
    rows = load_rows("hrbench4k", tsv)
    assert [r.key for r in rows] == ["0", "1", "2", "3"]
    assert rows[1].options == {"A": "27E", "B": "27B", "C": "37B", "D": "27D"} and rows[1].answer == "B"
    assert [r.cycle for r in rows] == ["0", "1", "0", "1"] and [r.category for r in rows] == ["single", "single", "cross", "cross"]
    assert all(r.image is None for r in rows)  # nothing decoded until a run needs it
    cache = tmp_path / "cache"
    materialise_images(rows[1:], tsv, cache)  # row 1 refers to row 0's image, row 3 to row 2's
    assert rows[0].image is None
    with Image.open(rows[1].image) as im:
        assert im.size == (64, 48) and im.format == "JPEG"
    with Image.open(rows[2].image) as im:
        assert im.size == (80, 40) and im.format == "PNG"
    assert rows[3].image == rows[2].image and rows[2].image.endswith(".png")
    check_images(rows[1:], images_root=None, data=tsv)
    # a second run reuses the decoded files
    mtime = (cache / "0.jpg").stat().st_mtime_ns
    again = load_rows("hrbench4k", tsv)
    materialise_images(again, tsv, cache)
    assert (cache / "0.jpg").stat().st_mtime_ns == mtime and again[0].image == again[1].image


def test_mme_realworld_lite_tsv_multichoice_column(tmp_path):
    """MME-RealWorld-Lite's VLMEvalKit TSV: options only in 'multi-choice options' (a list literal),
    category 'Task/Subtask', 'l2-category'."""
    header = ["index", "question", "multi-choice options", "answer", "category", "l2-category", "image"]
    rows = [
        {"index": 7, "question": "Where is the crane?", "multi-choice options": str(["(A) upper right", "(B) upper left", "(C) lower right", "(D) lower left", "(E) This image doesn't feature the position."]), "answer": "A", "category": "Perception/Remote Sensing", "l2-category": "position", "image": b64((40, 30))},
        {"index": 8, "question": "How many?", "multi-choice options": str(["(A) 1", "(B) 2", "(C) 3", "(D) 4", "(E) none"]), "answer": "E", "category": "Reasoning/Monitoring", "l2-category": "calculate", "image": "7"},
    ]
    tsv = write_tsv(tmp_path / "MME-RealWorld-Lite.tsv", header, rows)
    got = load_rows("mme-realworld-lite", tsv)
    assert got[0].options["E"] == "This image doesn't feature the position." and got[0].options["A"] == "upper right"
    assert (got[0].task, got[0].category, got[0].l2_category) == ("Perception", "Remote Sensing", "position")
    assert (got[1].task, got[1].category) == ("Reasoning", "Monitoring")
    materialise_images(got, tsv, tmp_path / "img")
    assert got[0].image == got[1].image


def test_vstar_tsv_with_hint_and_two_options(tmp_path):
    header = ["index", "question", "hint", "A", "B", "answer", "category", "image"]
    tsv = write_tsv(tmp_path / "VStarBench.tsv", header, [{"index": 181, "question": "Is the red balloon above or below the white balloon?", "hint": "", "A": "below", "B": "above", "answer": "A", "category": "relative_position", "image": b64((30, 20))}])
    (row,) = load_rows("vstar", tsv)
    assert row.options == {"A": "below", "B": "above"} and row.hint is None
    assert build_question(row) == "Question: Is the red balloon above or below the white balloon?\nOptions:\nA. below\nB. above\nPlease select the correct answer from the options above."


# --------------------------------------------------------------------------- parquet


def test_parquet_with_hf_image_struct_and_base64(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    common = {"question": ["Q1", "Q2"], "A": ["x", "y"], "B": ["y", "x"], "answer": ["A", "B"], "category": ["single", "cross"], "cycle_category": ["0", "1"]}
    t1 = pa.table({"index": [10, 11], **common, "image": [{"bytes": image_bytes((33, 22)), "path": "a.jpg"}, {"bytes": image_bytes((44, 11), fmt="PNG"), "path": "b.png"}]})
    pq.write_table(t1, tmp_path / "hr.parquet")
    rows = load_rows("hrbench8k", tmp_path / "hr.parquet")
    assert [r.key for r in rows] == ["10", "11"] and rows[1].answer == "B" and rows[1].cycle == "1"
    materialise_images(rows, tmp_path / "hr.parquet", tmp_path / "c1")
    assert [Image.open(r.image).size for r in rows] == [(33, 22), (44, 11)]
    t2 = pa.table({"index": [10, 11], **common, "image": [b64((5, 6)), b64((7, 8))]})
    pq.write_table(t2, tmp_path / "hr2.parquet")
    rows = load_rows("hrbench8k", tmp_path / "hr2.parquet")
    materialise_images(rows, tmp_path / "hr2.parquet", tmp_path / "c2")
    assert [Image.open(r.image).size for r in rows] == [(5, 6), (7, 8)]


# --------------------------------------------------------------------------- official JSON / JSONL


def test_vstar_official_jsonl_with_image_folder(tmp_path):
    (tmp_path / "direct_attributes").mkdir()
    Image.new("RGB", (50, 40)).save(tmp_path / "direct_attributes" / "sa_4690.jpg")
    line = {"image": "direct_attributes/sa_4690.jpg", "text": "What is the material of the glove?\n(A) rubber\n(B) cotton\n(C) kevlar\n(D) leather\nAnswer with the option's letter from the given choices directly.", "category": "direct_attributes", "question_id": 0, "label": "A"}
    (tmp_path / "test_questions.jsonl").write_text(json.dumps(line) + "\n")
    (row,) = load_rows("vstar", tmp_path / "test_questions.jsonl")
    assert row.question == "What is the material of the glove?" and row.options == {"A": "rubber", "B": "cotton", "C": "kevlar", "D": "leather"}
    assert row.answer == "A" and row.category == "direct_attributes"
    assert row.image == str(tmp_path / "direct_attributes" / "sa_4690.jpg")
    check_images([row], images_root=None, data=tmp_path / "test_questions.jsonl")
    assert "Answer with the option" not in build_question(row)


def test_mme_realworld_official_json_and_missing_images_listed(tmp_path):
    items = [
        {"Question_id": "perception/diagram_and_table/diagram/0558", "Image": "diagram_and_table/cons9.jpg", "Text": "What is the data of Interest in Feb-23 in the table?", "Question Type": "Multiple Choice", "Answer choices": ["(A) 458", "(B) 457", "(C) 456", "(D) 455", "(E) This image doesn't feature the data."], "Ground truth": "B", "Category": "diagram", "Subtask": "Diagram and Table", "Task": "Perception"},
        {"Question_id": "perception/monitoring/Vehicle/counting/0310", "Image": "monitoring_images/9999998.jpg", "Text": "What is the number of buses in the image?", "Answer choices": ["(A) 13", "(B) 90", "(C) 77", "(D) 6", "(E) The image does not feature the buses"], "Ground truth": "E", "Category": "Vehicle/counting", "Subtask": "Monitoring", "Task": "Perception"},
    ]
    data = tmp_path / "MME_RealWorld.json"
    data.write_text(json.dumps(items))
    root = tmp_path / "imgs"
    (root / "diagram_and_table").mkdir(parents=True)
    Image.new("RGB", (10, 10)).save(root / "diagram_and_table" / "cons9.jpg")
    rows = load_rows("mme-realworld", data, images_root=root)
    assert rows[1].answer == "E" and rows[1].options["D"] == "6"
    assert (rows[0].task, rows[0].category, rows[0].l2_category) == ("Perception", "Diagram and Table", "diagram")
    with pytest.raises(MissingImagesError) as e:
        check_images(rows, images_root=root, data=data)
    msg = str(e.value)
    assert "1 of 2 image(s) not found" in msg and "monitoring_images/9999998.jpg" in msg and str(root.resolve()) in msg
    assert "cons9" not in msg and "--images-root" in msg


def test_bad_rows_are_named(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"question_id": 1, "question": "q?", "answer": "A"}) + "\n")
    with pytest.raises(BenchmarkDataError, match=r"x.jsonl: row 1: no options"):
        load_rows("vstar", f)
    f.write_text("{not json\n")
    with pytest.raises(BenchmarkDataError, match="line 1 is not valid JSON"):
        load_rows("vstar", f)
    (tmp_path / "x.xlsx").write_text("a")
    with pytest.raises(BenchmarkDataError, match="unsupported data file type"):
        load_rows("vstar", tmp_path / "x.xlsx")
    with pytest.raises(BenchmarkDataError, match="benchmark data file not found"):
        load_rows("vstar", tmp_path / "nope.tsv")


# --------------------------------------------------------------------------- the corpus forms


@needs_corpus
def test_corpus_samples_and_annotations():
    s = CORPUS / "benchmarks" / "samples"
    counts = {b: len(load_rows(b, s / f"{b}.jsonl", images_root=CORPUS)) for b in ("vstar", "hrbench4k", "mme-realworld-lite", "mme-realworld")}
    assert counts == {"vstar": 1, "hrbench4k": 3, "mme-realworld-lite": 2, "mme-realworld": 1}
    for b in counts:
        check_images(load_rows(b, s / f"{b}.jsonl", images_root=CORPUS), images_root=CORPUS, data=s / f"{b}.jsonl")
    a = CORPUS / "benchmarks" / "annotations"
    assert len(load_rows("vstar", a / "vstar_bench.jsonl")) == 191
    hr = load_rows("hrbench4k", a / "hrbench_4k.jsonl")
    assert len(hr) == 800 and [r.cycle for r in hr[:5]] == ["0", "1", "2", "3", "0"] and [r.answer for r in hr[:4]] == ["A", "B", "C", "D"]
    lite = load_rows("mme-realworld-lite", a / "MME_RealWorld_Lite.jsonl")
    assert len(lite) == 1919 and len({r.key for r in lite}) == 1919  # repeated ids stay separate rows
    assert {r.task for r in lite} == {"Perception", "Reasoning"}  # from perception/ Perception/ reason/ reasoning/ prefixes


@needs_corpus
def test_prompt_is_the_text_the_reference_evaluated():
    """The README example of the Thyme repository carries the question text the reference built."""
    readme = next(r for r in corpus_records() if r["id"] == "thyme-readme-17127")
    (row, _) = load_rows("mme-realworld-lite", CORPUS / "benchmarks" / "samples" / "mme-realworld-lite.jsonl", images_root=CORPUS)
    assert row.question_id == readme["question_id"]
    assert "<image>\n" + build_question(row) == readme["question"]


def test_chinese_questions_get_the_chinese_instruction(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question_id": 1, "question": "图中的车是什么颜色？", "options": "A. 红\nB. 蓝", "answer": "A", "image": "x.jpg"}, ensure_ascii=False) + "\n")
    (row,) = load_rows("vstar", f)
    assert build_question(row).endswith("B. 蓝\n请直接回答选项字母。")
