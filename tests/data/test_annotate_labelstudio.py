"""The RL annotation round trip against a real Label Studio (issue 19).

Needs a running server: ``THYME_LABEL_STUDIO_URL``, ``THYME_LABEL_STUDIO_TOKEN`` (first annotator)
and ``THYME_LABEL_STUDIO_TOKEN_2`` (second annotator). ``make test-labelstudio`` starts a throw-away
server with both (``.ci/labelstudio.py``) and sets ``THYME_REQUIRE_LABEL_STUDIO=1``, which turns
the skip into a failure. Nothing of Label Studio is mocked: the project (thyme's labeling config),
tasks, annotations and export are the server's own; thyme talks to it over HTTP.

``thyme data annotate export`` on three images (two large, one too small) -> a project with
:data:`thyme.data.annotate.LABEL_CONFIG` -> the tasks imported -> box + question + answer +
category + note from two annotators:

- task A: boxes overlapping (IoU ~0.8), answers "STOP" / "stop."    -> one record, both annotators
- task B: boxes apart (IoU 0), the same answer                      -> rejected, ``disagreement``

-> the project's JSON export -> ``thyme data annotate import`` -> the kept and rejected records.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import FILES_ROOT, STRICT, URL

W, H = 2400, 600


def _photos(folder: Path) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in (("street.png", (90, 90, 90)), ("shelf.png", (200, 180, 150))):
        im = Image.new("RGB", (W, H), colour)
        ImageDraw.Draw(im).rectangle((100, 100, 160, 140), fill=(220, 0, 0))  # the small object
        im.save(folder / name)
    Image.new("RGB", (640, 480), (0, 0, 0)).save(folder / "thumb.png")  # too small
    return folder


def _thyme(*args: str) -> dict:
    p = subprocess.run(
        [sys.executable, "-m", "thyme.cli", "data", "annotate", *args, "--json"], capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _result(box: tuple[int, int, int, int], question: str, answer: str, category: str, note: str = "") -> list[dict]:
    from thyme.data.labelstudio import choices_result, rectangle_result, text_result

    out = [
        rectangle_result("box", "image", box, (W, H), "target"),
        text_result("question", "image", question),
        text_result("answer", "image", answer),
        choices_result("category", "image", category),
    ]
    return out + ([text_result("note", "image", note)] if note else [])


def _round_trip(
    server, tmp_path: Path, request, photos: Path, export_flags: tuple[str, ...] = (), push: bool = False
) -> tuple[dict, Path, int]:
    """Export, the project, two annotators' annotations, the export, import; ``push``: the project
    made and the tasks imported by ``export --push`` (else through the client)."""
    from thyme.data.annotate import LABEL_CONFIG

    one, two = server
    flags = ("--push", URL, "--token-env", "THYME_LABEL_STUDIO_TOKEN", "--project-title", "thyme annotate round trip") if push else ()
    exported = _thyme("export", str(photos), "--out", str(tmp_path / "ls"), *export_flags, *flags)
    assert (exported["tasks"], exported["skipped"], exported["reasons"]) == (2, 1, {"too small": 1}), exported
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text(encoding="utf-8"))
    config = (tmp_path / "ls" / "labeling_config.xml").read_text(encoding="utf-8")
    assert config == LABEL_CONFIG

    if push:
        pid = exported["project_id"]
        assert exported["pushed"] == 2
    else:
        pid = one.create_project("thyme annotate round trip", config)["id"]
    request.addfinalizer(lambda: one.delete_project(pid))
    if not push:
        assert one.import_tasks(pid, tasks) == 2
    by_image = {t["data"]["thyme_image"]: t for t in one.list_tasks(pid)}
    assert sorted(by_image) == ["shelf.png", "street.png"]
    for t in tasks:  # the tasks travelled intact
        assert by_image[t["data"]["thyme_image"]]["data"]["image"] == t["data"]["image"]
    a, b = by_image["street.png"]["id"], by_image["shelf.png"]["id"]

    # task A: the two annotators agree (IoU ~0.8; answers equal after normalisation)
    one.create_annotation(a, _result((98, 98, 162, 142), "What colour is the small sign?", "STOP", "OCR", "top left"))
    two.create_annotation(a, _result((100, 101, 166, 145), "What does the small sign say?", "stop.", "OCR"))
    # task B: they disagree (boxes apart)
    one.create_annotation(b, _result((100, 100, 160, 140), "What is on the top shelf?", "jam", "object"))
    two.create_annotation(b, _result((1800, 400, 1860, 440), "What is on the bottom shelf?", "jam", "object"))

    export = tmp_path / "export.json"
    export.write_bytes(one.export_project(pid))
    rl = tmp_path / "rl.jsonl"
    s = _thyme("import", str(export), "--out", str(rl), "--rejected", str(tmp_path / "rejected.jsonl"), "--images-root", str(photos))
    return s, rl, pid


def test_annotate_round_trip_against_label_studio(server, tmp_path, request):
    photos = _photos(tmp_path / "photos")
    s, rl, pid = _round_trip(server, tmp_path, request, photos)
    assert (s["tasks"], s["bad_tasks"], s["annotations"], s["kept"], s["rejected"]) == (2, 0, 4, 1, 1), s

    (rec,) = [json.loads(l) for l in rl.read_text(encoding="utf-8").splitlines()]
    assert rec["images"] == [str((photos / "street.png").resolve())]
    assert (rec["question"], rec["solution"], rec["category"]) == ("What colour is the small sign?", "STOP", "OCR")
    assert rec["image_size"] == [W, H]
    assert all(abs(v - w) <= 1 for v, w in zip(rec["bbox"], [98, 98, 162, 142])), rec["bbox"]  # percent and back, within a pixel
    assert len(rec["annotators"]) == 2 and len(set(rec["annotators"])) == 2  # two distinct annotators listed
    assert rec["messages"][1]["content"].startswith("<image>\n")

    (rej,) = [json.loads(l) for l in (tmp_path / "rejected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rej["reason"] == "disagreement" and rej["image"] == "shelf.png"
    assert rej["iou"] == 0 and rej["answers"] == ["jam", "jam"] and len(set(rej["annotators"])) == 2
    assert [d["task"] for d in s["disagreements"]] == [rej["task"]]

    # the same annotations fetched from the server (import --from-server, the second annotator's token): the same records
    s2 = _thyme(
        "import",
        "--out",
        str(tmp_path / "rl2.jsonl"),
        "--from-server",
        URL,
        "--project",
        str(pid),
        "--token-env",
        "THYME_LABEL_STUDIO_TOKEN_2",
        "--images-root",
        str(photos),
    )
    assert (s2["kept"], s2["rejected"]) == (1, 1)
    assert (tmp_path / "rl2.jsonl").read_text(encoding="utf-8") == rl.read_text(encoding="utf-8")
    assert (tmp_path / "rl2.export.json").is_file()

    # the kept record trains unchanged
    from thyme.train.rl.data import load_prompts

    (p,) = load_prompts([str(rl)])
    assert p.bbox == [float(v) for v in rec["bbox"]] and p.category == "OCR" and p.extra["annotators"] == rec["annotators"]


def test_annotate_local_files_images_are_served_by_label_studio(server, tmp_path, request):
    """``--image-mode local-files`` with ``--push``: Label Studio serves the exported images (the
    harness starts it with local-file serving; ``--push`` made the project and its local-files
    storage) and the round trip gives the same split."""
    one, _ = server
    if not FILES_ROOT:
        if STRICT:
            pytest.fail("THYME_LABEL_STUDIO_FILES_ROOT is not set (make test-labelstudio sets it)")
        pytest.skip("no local-files root of the server")
    photos = _photos(Path(FILES_ROOT) / "annotate photos")  # a space: the URL must quote it
    flags = ("--image-mode", "local-files", "--local-files-root", FILES_ROOT)
    s, _, _ = _round_trip(server, tmp_path, request, photos, flags, push=True)  # --push adds the local-files storage
    assert (s["kept"], s["rejected"]) == (1, 1), s
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text(encoding="utf-8"))
    for t in tasks:
        url = t["data"]["image"]
        assert url.startswith("/data/local-files/?d=annotate%20photos/")
        assert one.download(url) == (photos / t["data"]["thyme_image"]).read_bytes()
