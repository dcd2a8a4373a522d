"""``thyme data annotate`` (issue 19): export filtering with reasons, the tasks and labeling config,
the import checks (one test per rejection reason), the cross-check rule, the records read by
``thyme train rl`` and the veRL converter with bbox/category carried, and hostile exports/paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from thyme.data import annotate as A
from thyme.data.labelstudio import choices_result, rectangle_result, text_result
from thyme.errors import ThymeError

W, H = 2100, 400  # only the longer side counts: 2100 >= 2048


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "thyme.cli", "data", "annotate", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    Image.new("RGB", (W, H), (10, 120, 200)).save(d / "big.png")
    Image.new("RGB", (300, 2048), (200, 10, 10)).save(d / "sub" / "tall.png")  # longer side exactly 2048: kept
    Image.new("RGB", (2047, 600), (0, 0, 0)).save(d / "small.png")
    (d / "notes.txt").write_text("not an image\n", encoding="utf-8")
    Image.new("RGB", (2200, 300), (50, 50, 50)).save(d / "cut.jpg", quality=90)
    raw = (d / "cut.jpg").read_bytes()
    (d / "cut.jpg").write_bytes(raw[: len(raw) // 2])  # header intact, pixels cut off
    return d


# --------------------------------------------------------------------------- export


def test_export_keeps_large_images_and_names_every_file_left_out_with_its_reason(images, tmp_path):
    out = tmp_path / "ls"
    p = _cli("export", str(images), "--out", str(out), "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert (s["files"], s["tasks"], s["skipped"]) == (5, 2, 3)
    assert s["reasons"] == {"too small": 1, "not an image": 1, "truncated": 1}
    skipped = {r["file"]: r["reason"] for r in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    assert skipped == {"small.png": "too small", "notes.txt": "not an image", "cut.jpg": "truncated"}
    for name, reason in skipped.items():  # named on stderr too
        assert f"skipped {name}: {reason}" in p.stderr
    tasks = json.loads((out / "tasks.json").read_text())
    assert [t["data"]["thyme_image"] for t in tasks] == ["big.png", "sub/tall.png"]
    assert [t["data"]["thyme_size"] for t in tasks] == [[W, H], [300, 2048]]
    assert all(t["data"]["image"].startswith("data:image/png;base64,") for t in tasks)


def test_min_long_side_is_a_flag(images, tmp_path):
    s = A.export_annotation(images, tmp_path / "ls", A.AnnotateConfig(min_long_side=2100))
    assert s.tasks == 1 and s.reasons["too small"] == 2  # tall.png (2048) and small.png now too small


def test_labeling_config_has_box_question_answer_six_categories_and_note(images, tmp_path):
    A.export_annotation(images, tmp_path / "ls")
    xml = (tmp_path / "ls" / "labeling_config.xml").read_text()
    assert xml == A.LABEL_CONFIG
    root = ET.fromstring(xml)
    tags = {(e.tag, e.get("name")) for e in root.iter()}
    assert {("Image", "image"), ("RectangleLabels", "box"), ("TextArea", "question"), ("TextArea", "answer")} <= tags
    assert {("Choices", "category"), ("TextArea", "note")} <= tags
    cats = [c.get("value") for c in root.iter("Choice")]
    assert cats == ["OCR", "attribute", "location", "quantity", "object", "chart understanding"] == list(A.CATEGORIES)
    assert root.find("Image").get("value") == "$image"


def test_local_files_mode_writes_urls_relative_to_the_document_root(images, tmp_path):
    cfg = A.AnnotateConfig(image_mode="local-files", local_files_root=str(tmp_path), max_image_mb=0.001)
    s = A.export_annotation(images, tmp_path / "ls", cfg)
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert s.tasks == 2 and tasks[0]["data"]["image"] == "/data/local-files/?d=photos/big.png"  # no data-URL size cap here
    with pytest.raises(ThymeError, match="outside the local-files root"):
        A.export_annotation(images, tmp_path / "ls2", A.AnnotateConfig(image_mode="local-files", local_files_root=str(images / "sub")))
    assert not (tmp_path / "ls2" / "tasks.json").exists()  # refused before any work


def test_an_image_over_max_image_mb_is_left_out_of_data_url_tasks(images, tmp_path):
    s = A.export_annotation(images, tmp_path / "ls", A.AnnotateConfig(max_image_mb=0.001))
    assert s.tasks == 0 and s.reasons["too large for a data URL"] == 2


def test_export_from_a_list_file_refuses_paths_leaving_its_folder(images, tmp_path):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (W, H)).save(outside)
    lst = images / "list.txt"
    lst.write_text(f"big.png\n# a comment\n\n../outside.png\n{outside}\nnope.png\n", encoding="utf-8")
    s = A.export_annotation(lst, tmp_path / "ls")
    skipped = [json.loads(l) for l in (tmp_path / "ls" / "skipped.jsonl").read_text().splitlines()]
    assert s.tasks == 1
    assert [(r["file"], r["reason"]) for r in skipped] == [
        ("../outside.png", "outside the folder"),
        (str(outside), "outside the folder"),
        ("nope.png", "missing"),
    ]
    s2 = A.export_annotation(lst, tmp_path / "ls2", A.AnnotateConfig(allow_absolute_paths=True))
    assert s2.tasks == 3  # the user's opt-in


def test_export_leaves_out_an_exif_rotated_image(images, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees in a browser
    Image.new("RGB", (W, H)).save(images / "turned.jpg", exif=exif.tobytes())
    s = A.export_annotation(images, tmp_path / "ls")
    skipped = {r["file"]: r["reason"] for r in map(json.loads, (tmp_path / "ls" / "skipped.jsonl").read_text().splitlines())}
    assert skipped["turned.jpg"] == "exif rotated" and s.tasks == 2


def test_export_of_one_image_file(images, tmp_path):
    s = A.export_annotation(images / "big.png", tmp_path / "ls")
    assert (s.files, s.tasks) == (1, 1)
    assert json.loads((tmp_path / "ls" / "tasks.json").read_text())[0]["data"]["thyme_image"] == "big.png"
    s = A.export_annotation(images / "cut.jpg", tmp_path / "ls2")  # named with its reason, not read as a list
    assert (s.files, s.tasks, s.reasons) == (1, 0, {"truncated": 1})


def test_export_does_not_follow_symlinks_out_of_the_folder(images, tmp_path):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (W, H)).save(outside)
    os.symlink(outside, images / "link.png")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", images / "linkdir")
    s = A.export_annotation(images, tmp_path / "ls")
    skipped = {r["file"]: r["reason"] for r in map(json.loads, (tmp_path / "ls" / "skipped.jsonl").read_text().splitlines())}
    assert skipped["link.png"] == "outside the folder" and skipped["linkdir"] == "outside the folder"
    assert "secret" not in (tmp_path / "ls" / "tasks.json").read_text()
    assert s.tasks == 2


# --------------------------------------------------------------------------- import


def _ann(aid: int, who: str, box=(100, 100, 140, 130), question="What is written on the sign?", answer="STOP", category="OCR"):
    result = []
    if box is not None:
        result.append(rectangle_result("box", "image", box, (W, H), "target"))
    if question is not None:
        result.append(text_result("question", "image", question))
    if answer is not None:
        result.append(text_result("answer", "image", answer))
    if category is not None:
        result.append(choices_result("category", "image", category))
    result.append(text_result("note", "image", "zoom on the left"))
    return {"id": aid, "completed_by": {"id": aid, "email": who}, "result": result, "was_cancelled": False}


def _task(tid: int, *anns, image="big.png"):
    return {"id": tid, "data": {"image": "data:...", "thyme_image": image, "thyme_size": [W, H]}, "annotations": list(anns)}


def _import(tmp_path: Path, images: Path, tasks, **cfg):
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks), encoding="utf-8")
    out, rej = tmp_path / "rl.jsonl", tmp_path / "rejected.jsonl"
    s = A.import_annotations(export, out, rej, A.AnnotateConfig(**cfg), images_root=images)
    kept = [json.loads(l) for l in out.read_text().splitlines()]
    rejected = [json.loads(l) for l in rej.read_text().splitlines()]
    return s, kept, rejected


def test_a_checked_annotation_becomes_an_rl_record_in_the_released_schema(images, tmp_path):
    from thyme import protocol

    s, kept, rejected = _import(tmp_path, images, [_task(1, _ann(11, "a@x"))])
    assert (s.kept, s.rejected, rejected) == (1, 0, [])
    (r,) = kept
    img = str((images / "big.png").resolve())
    assert r["images"] == [img]
    assert r["messages"][0] == {"role": "system", "content": protocol.SYSTEM_PROMPT}
    user = r["messages"][1]
    assert user["role"] == "user" and user["content"].startswith("<image>\n") and user["content"].count("<image>") == 1
    assert "What is written on the sign?" in user["content"] and img in user["content"] and f"{W}x{H}" in user["content"]
    assert (r["solution"], r["question"], r["category"]) == ("STOP", "What is written on the sign?", "OCR")
    assert r["bbox"] == [100, 100, 140, 130] and all(isinstance(v, int) for v in r["bbox"])
    assert (r["annotators"], r["image_size"], r["id"]) == (["a@x"], [W, H], "task-1")


@pytest.mark.parametrize(
    "ann, reason",
    [
        (_ann(1, "a", box=None), "missing_box"),
        (_ann(1, "a", box=(2080, 10, 2120, 40)), "box_outside_image"),  # right edge past the image
        (_ann(1, "a", box=(100, 100, 100, 130)), "box_empty"),
        (_ann(1, "a", box=(0, 0, 500, 200)), "box_too_large"),  # 11.9% of the image
        (_ann(1, "a", question=None), "missing_question"),
        (_ann(1, "a", question="   "), "missing_question"),
        (_ann(1, "a", answer=None), "missing_answer"),
        (_ann(1, "a", category="colour"), "unknown_category"),
        (_ann(1, "a", category=None), "unknown_category"),
    ],
)
def test_each_failing_check_is_rejected_with_its_reason(images, tmp_path, ann, reason):
    s, kept, rejected = _import(tmp_path, images, [_task(7, ann)])
    assert kept == [] and [r["reason"] for r in rejected] == [reason]
    assert rejected[0]["task"] == 7 and rejected[0]["annotator"] == "a" and rejected[0]["detail"]


def test_box_area_threshold_is_a_setting(images, tmp_path):
    big = _ann(1, "a", box=(0, 0, 500, 200))  # 11.9%
    s, kept, _ = _import(tmp_path, images, [_task(1, big)], max_area=0.2)
    assert s.kept == 1 and kept[0]["bbox"] == [0, 0, 500, 200]


def test_two_boxes_a_rotated_box_and_image_size_mismatch_are_rejected(images, tmp_path):
    two = _ann(1, "a")
    two["result"].append(rectangle_result("box", "image", (10, 10, 20, 20), (W, H), "target"))
    other = _ann(2, "b")
    other["result"][0]["original_width"] = W // 2
    turned = _ann(3, "c")
    turned["result"][0]["value"]["rotation"] = 30
    _, kept, rejected = _import(tmp_path, images, [_task(1, two), _task(2, other), _task(3, turned)])
    assert kept == [] and [r["reason"] for r in rejected] == ["several_boxes", "image_size_mismatch", "box_rotated"]


# --------------------------------------------------------------------------- cross-check


def test_cross_check_agreeing_pair_is_one_record_with_the_first_annotators_box(images, tmp_path):
    a = _ann(21, "a@x", box=(100, 100, 140, 130), answer="STOP")
    b = _ann(22, "b@x", box=(104, 102, 142, 131), answer="stop.", question="What does the red sign say?", category="object")
    s, kept, rejected = _import(tmp_path, images, [_task(3, b, a)])  # order in the export does not matter: lowest id first
    assert rejected == [] and s.kept == 1
    (r,) = kept
    assert r["annotators"] == ["a@x", "b@x"]
    assert (r["bbox"], r["solution"], r["question"], r["category"]) == ([100, 100, 140, 130], "STOP", "What is written on the sign?", "OCR")
    assert r["label_studio"] == {"task": 3, "annotation": 21}


def test_cross_check_boxes_below_iou_half_are_a_disagreement(images, tmp_path):
    a = _ann(21, "a", box=(100, 100, 140, 130))
    b = _ann(22, "b", box=(125, 100, 165, 130))  # IoU 15/65 = 0.23
    s, kept, rejected = _import(tmp_path, images, [_task(4, a, b)])
    assert kept == [] and [r["reason"] for r in rejected] == ["disagreement"]
    d = rejected[0]
    assert d["annotators"] == ["a", "b"] and d["iou"] == pytest.approx(15 / 65, abs=1e-3) and d["answers"] == ["STOP", "STOP"]
    assert s.disagreements == [{"task": 4, "annotators": ["a", "b"], "iou": d["iou"], "answers": ["STOP", "STOP"]}]


def test_cross_check_iou_exactly_at_the_threshold_agrees(images, tmp_path):
    a = _ann(21, "a", box=(100, 100, 130, 130))
    b = _ann(22, "b", box=(110, 100, 140, 130))  # IoU 20/40 = 0.5
    assert A.iou([100, 100, 130, 130], [110, 100, 140, 130]) == 0.5
    s, kept, _ = _import(tmp_path, images, [_task(4, a, b)])
    assert s.kept == 1


def test_cross_check_different_answers_are_a_disagreement(images, tmp_path):
    a = _ann(21, "a", answer="STOP")
    b = _ann(22, "b", answer="SHOP")
    _, kept, rejected = _import(tmp_path, images, [_task(5, a, b)])
    assert kept == [] and rejected[0]["reason"] == "disagreement" and rejected[0]["iou"] == 1.0
    assert rejected[0]["answers"] == ["STOP", "SHOP"]


def test_answers_agree_under_the_project_normalisation():
    assert A.answers_agree("STOP", " stop. ")
    assert A.answers_agree("$42$", "42")
    assert not A.answers_agree("42", "43")
    assert not A.answers_agree("red car", "blue car")


def test_a_latest_annotation_counts_and_an_invalid_one_does_not_block_the_valid(images, tmp_path):
    early = _ann(1, "a", answer="SHOP")
    late = _ann(5, "a", answer="STOP")  # a's latest
    bad = _ann(3, "b", question=None)
    s, kept, rejected = _import(tmp_path, images, [_task(6, early, late, bad)])
    assert [r["reason"] for r in rejected] == ["missing_question"]
    assert kept[0]["annotators"] == ["a"] and kept[0]["solution"] == "STOP"
    s2, kept2, rejected2 = _import(tmp_path, images, [_task(6, early, late, bad)], min_annotators=2)
    assert kept2 == [] and [r["reason"] for r in rejected2] == ["missing_question", "too_few_annotators"]


def test_skipped_annotations_and_unannotated_tasks_write_nothing(images, tmp_path):
    cancelled = dict(_ann(1, "a"), was_cancelled=True)
    s, kept, rejected = _import(tmp_path, images, [_task(1, cancelled), _task(2)])
    assert (kept, rejected, s.unannotated) == ([], [], 2)


# --------------------------------------------------------------------------- consumers


def test_records_load_in_thyme_train_rl_with_bbox_and_category(images, tmp_path):
    from thyme.train.rl.data import RLPrompt, load_prompts

    _import(tmp_path, images, [_task(1, _ann(11, "a@x")), _task(2, _ann(12, "b@x", box=(1000, 200, 1100, 260), category="quantity"))])
    prompts = load_prompts([str(tmp_path / "rl.jsonl")], images_root=str(images))
    assert [p.bbox for p in prompts] == [[100.0, 100.0, 140.0, 130.0], [1000.0, 200.0, 1100.0, 260.0]]
    assert [p.category for p in prompts] == ["OCR", "quantity"]
    assert prompts[0].extra == {"annotators": ["a@x"], "image_size": [W, H]}
    assert prompts[0].solution == "STOP" and prompts[0].images == [str((images / "big.png").resolve())]
    assert prompts[0].target_meta() == {
        "annotators": ["a@x"],
        "image_size": [W, H],
        "bbox": [100.0, 100.0, 140.0, 130.0],
        "category": "OCR",
    }
    back = RLPrompt.from_json(prompts[0].to_json())  # what veRL passes through parquet
    assert back == prompts[0]
    old = json.loads(prompts[0].to_json())
    for k in ("bbox", "category", "extra"):
        old.pop(k)
    assert RLPrompt.from_json(json.dumps(old)).bbox is None  # prompts written before these fields still load


def test_the_verl_converter_carries_the_target(images, tmp_path):
    from thyme.integrations.verl.data import verl_row
    from thyme.train.rl.data import RLPrompt, load_prompts

    _import(tmp_path, images, [_task(1, _ann(11, "a@x"))])
    (p,) = load_prompts([str(tmp_path / "rl.jsonl")], images_root=str(images))
    row = verl_row(p, 0)
    back = RLPrompt.from_json(row["extra_info"]["thyme"])
    assert back.bbox == [100.0, 100.0, 140.0, 130.0] and back.category == "OCR"
    assert row["reward_model"]["ground_truth"] == "STOP"


@pytest.mark.parametrize("bbox", [[1, 2, 3], [5, 5, 1, 9], ["1", 2, 3, 4], [0, 0, float("inf"), 1], True])
def test_train_rl_refuses_a_malformed_bbox(tmp_path, bbox):
    from thyme.train.rl.data import load_prompts

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    row = A.rl_record("q?", str(tmp_path / "a.png"), (8, 8), "x")
    row["bbox"] = bbox
    (tmp_path / "rl.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ThymeError, match="bbox"):
        load_prompts([str(tmp_path / "rl.jsonl")])


# --------------------------------------------------------------------------- hostile input


def test_a_deeply_nested_export_is_refused_naming_the_file(images, tmp_path):
    export = tmp_path / "deep.json"
    export.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ThymeError, match="deep.json"):
        A.import_annotations(export, tmp_path / "rl.jsonl", cfg=A.AnnotateConfig(), images_root=images)


def test_an_export_over_the_size_cap_is_refused_before_reading(images, tmp_path):
    export = tmp_path / "huge.json"
    with open(export, "wb") as f:
        f.truncate(3 << 20)  # sparse: 3 MiB of zeros
    with pytest.raises(ThymeError, match="max-export-mb"):
        A.import_annotations(export, tmp_path / "rl.jsonl", cfg=A.AnnotateConfig(max_export_mb=1), images_root=images)


def test_bad_tasks_are_listed_not_fatal(images, tmp_path):
    tasks = [
        "not a task",
        {"id": 2, "data": []},
        {"id": 3, "data": {"image": "x"}},
        _task(4, "not an annotation", {"id": 9, "result": []}),
        _task(5, _ann(1, "a")),
    ]
    s, kept, rejected = _import(tmp_path, images, tasks)
    assert s.kept == 1 and s.bad_tasks == 3
    assert [r["reason"] for r in rejected] == ["bad_task", "bad_task", "bad_task", "bad_annotation", "bad_annotation"]
    assert "task 3 of the Label Studio export" in rejected[2]["detail"] and "thyme_image" in rejected[2]["detail"]


def test_task_image_paths_escaping_the_images_root_are_refused(images, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (W, H)).save(secret)
    tasks = [_task(1, _ann(1, "a"), image="../secret.png"), _task(2, _ann(2, "a"), image=str(secret))]
    s, kept, rejected = _import(tmp_path, images, tasks)
    assert kept == [] and [r["reason"] for r in rejected] == ["bad_task", "bad_task"]
    assert "climbs out" in rejected[0]["detail"] and "absolute and outside" in rejected[1]["detail"]
    s2, kept2, _ = _import(tmp_path, images, tasks, allow_absolute_paths=True)
    assert s2.kept == 2  # the user's opt-in


def test_hostile_text_is_bounded_and_stripped_of_control_characters(images, tmp_path):
    a = _ann(1, "evil\x1b[31m@x", question="What\x1b[2J is it?" + "x" * 10000, answer="ok\x07")
    _, kept, _ = _import(tmp_path, images, [_task(1, a)])
    (r,) = kept
    assert "\x1b" not in r["question"] and len(r["question"]) <= 2000 and r["solution"] == "ok"
    assert r["annotators"] == ["evil[31m@x"]


def test_import_cli_prints_the_rule_and_writes_the_default_rejected_file(images, tmp_path):
    export = tmp_path / "export.json"
    export.write_text(json.dumps([_task(1, _ann(1, "a")), _task(2, _ann(2, "a", answer=None))]))
    p = _cli("import", str(export), "--out", str(tmp_path / "rl.jsonl"), "--images-root", str(images))
    assert p.returncode == 0, p.stderr
    assert "IoU >= 0.5" in p.stdout and "1 record(s) kept, 1 rejected" in p.stdout
    assert json.loads((tmp_path / "rl.rejected.jsonl").read_text())["reason"] == "missing_answer"
    bad = _cli("import", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.jsonl"))
    assert bad.returncode == 2 and "missing.json" in bad.stderr


def test_server_flags_need_a_token_and_one_source(images, tmp_path):
    env_less = {k: v for k, v in os.environ.items() if k != "THYME_NO_SUCH_TOKEN"}
    p = subprocess.run(
        [sys.executable, "-m", "thyme.cli", "data", "annotate", "export", str(images), "--out", str(tmp_path / "ls")]
        + ["--push", "http://127.0.0.1:9", "--token-env", "THYME_NO_SUCH_TOKEN"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env_less,
    )
    assert p.returncode == 2 and "$THYME_NO_SUCH_TOKEN" in p.stderr
    both = _cli(
        "import", str(tmp_path / "e.json"), "--out", str(tmp_path / "x.jsonl"), "--from-server", "http://127.0.0.1:9", "--project", "1"
    )
    neither = _cli("import", "--out", str(tmp_path / "x.jsonl"))
    assert both.returncode == neither.returncode == 2 and "either an export file or --from-server" in neither.stderr
