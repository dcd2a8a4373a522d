"""The HTML trajectory report: crop regions, escaping, inputs, and the corpus replay in Chromium."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageStat

from thyme.agent import Trajectory, Turn
from thyme.cli import report as report_commands
from thyme.report import ReportError, ReportItem, answers_agree, load_items, write_report
from thyme.scoring.crops import crop_regions, parse_crop_fix

from ..conftest import CORPUS, HAVE_CORPUS, needs_corpus

README_CODE = """import cv2
image_path = "/eval/17127.jpg"
image = cv2.imread(image_path)
x1, y1, x2, y2 = 1250, 1030, 1360, 1070
cropped_image = image[y1:y2, x1:x2]
resized = cv2.resize(cropped_image, None, fx=2, fy=2)
"""


# --------------------------------------------------------------------------- crop regions


def test_crop_regions_from_literal_code():
    code = "from PIL import Image\nx1, y1, x2, y2 = 10, 20, 110, 220\nimg = Image.open(image_path)\nc = img.crop((x1, y1, x2, y2))\n"
    (r,) = crop_regions(code, (400, 300))
    assert (r.box, r.requested, r.line) == ((10, 20, 110, 220), None, 4)

    # sizes read from the image, arithmetic, numpy slices (rows first), box= keyword
    code = (
        "import cv2\nimage = cv2.imread(image_path)\nh, w = image.shape[:2]\n"
        "top = image[h // 2:h, 0:w // 4]\n"
        "from PIL import Image\nim = Image.open('in.jpg').convert('RGB')\nW, H = im.size\n"
        "box = (W - 100, 0, W, H / 3)\npart = im.crop(box=box)\n"
    )
    boxes = [r.box for r in crop_regions(code, (400, 300))]
    assert boxes == [(0, 150, 100, 300), (300, 0, 400, 100)]

    # crops of other images (an earlier output, a resized copy) are not regions of the input
    code = (
        "from PIL import Image\nout = Image.open('/mnt/data/temp_processed_images/a.png')\nout.crop((0, 0, 50, 50))\n"
        "img = Image.open(image_path)\nsmall = img.resize((100, 100))\nsmall.crop((0, 0, 50, 50))\n"
        "for i in range(3):\n    img.crop((i, i, i + 10, i + 10))\n"
    )
    assert crop_regions(code, (400, 300)) == []
    # never raises on code it cannot read
    assert crop_regions("def (:", (10, 10)) == [] and crop_regions("x = 1/0\nimg = Image.open(p)\nimg.crop(x)", (10, 10)) == []
    assert crop_regions(README_CODE, None) == []


def test_crop_regions_follow_the_sandbox_repairs():
    fix = {
        "name": "crop_min_side",
        "detail": "crop [1030:1070, 1250:1360] -> [1018:1082, 1250:1360] on a 2496x1392 image (sides grown to at least 64 px)",
        "line": 5,
    }
    (r,) = crop_regions(README_CODE, (2496, 1392), [fix])
    assert r.box == (1250, 1018, 1360, 1082) and r.requested == (1250, 1030, 1360, 1070) and r.line == 5
    # a repair on an image of another size (a zoomed output) is not a region of the input
    other = dict(fix, detail=fix["detail"].replace("2496x1392", "220x80"))
    (r,) = crop_regions(README_CODE, (2496, 1392), [other])
    assert r.requested is None and r.box == (1250, 1030, 1360, 1070)
    # a repair whose crop the code reader could not follow is still drawn
    clamp = {"name": "crop_clamped", "detail": "crop box (-20, 5.5, 90, 50) -> (0, 6, 90, 70) on a 100x100 image", "line": 2}
    (r,) = crop_regions("boxes = detect()\nimg.crop(boxes[0])\n", (100, 100), [clamp])
    assert (r.box, r.requested, r.source) == ((0, 6, 90, 70), (-20, 6, 90, 50), "repair")
    assert parse_crop_fix("dedent") is None


def test_answer_agreement_rule():
    assert answers_agree("D. MICHIGAN", "D") and answers_agree("(B)", "b") and answers_agree("$$x^2$$", "x^2")
    assert not answers_agree("Dog", "D") and not answers_agree("A. 206", "B") and not answers_agree("12", "1")


# --------------------------------------------------------------------------- pages


def _image(path: Path, size=(300, 200), seed=0) -> str:
    Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")).save(path)
    return str(path)


def _trajectory(
    tmp_path: Path, *, text: str = "<think>look", question: str = "What is it?", code: str | None = None, tid: str = "t1"
) -> Trajectory:
    inp = _image(tmp_path / f"{tid}-in.png")
    out = _image(tmp_path / f"{tid}-out.png", (80, 60), 1)
    code = (
        code
        or "from PIL import Image\nimg = Image.open(image_path)\nimg.crop((10, 10, 90, 70)).save('/mnt/data/temp_processed_images/o.png')\n"
    )
    ex = {
        "ok": True,
        "stdout": "/mnt/data/temp_processed_images/o.png\n",
        "error": None,
        "images": [out],
        "timed_out": False,
        "state_lost": False,
        "fixes": [{"name": "dedent", "detail": "removed 4 columns", "line": 1}],
        "duration_s": 0.05,
    }
    turns = [
        Turn(
            0,
            f"{text}<code>\n```python\n{code}```\n</code>",
            "stop",
            "code",
            code=code,
            execution=ex,
            feedback=[
                {"type": "text", "text": "\n<sandbox_output>"},
                {"type": "image", "image": out},
                {"type": "text", "text": "</sandbox_output>"},
            ],
        ),
        Turn(1, "</think>\n<answer>B</answer>", "stop", "answer"),
    ]
    return Trajectory(id=tid, question=question, images=[inp], shown_paths=[inp], turns=turns, answer="B", stop_reason="answer")


PAYLOAD = '<img src=x onerror="document.body.dataset.pwned=1"><script>document.body.dataset.pwned=2</script>'


def _hostile(tmp_path: Path) -> ReportItem:
    traj = _trajectory(
        tmp_path,
        text="<think>" + PAYLOAD + "</pre></div>",
        question="Q " + PAYLOAD,
        code="print('</script><script>alert(1)</script>')\n",
        tid="evil",
    )
    traj.turns[0].execution["stdout"] = PAYLOAD
    traj.turns[0].execution["fixes"] = [{"name": "crop_clamped", "detail": PAYLOAD, "line": 1}]
    return ReportItem(trajectory=traj, category='cat"><script>document.body.dataset.pwned=3</script>', ground_truth=PAYLOAD, correct=False)


def test_everything_from_the_model_is_escaped(tmp_path):
    out = write_report([_hostile(tmp_path), _trajectory(tmp_path, tid="ok")], tmp_path / "r.html")
    page = out.read_text()
    assert page.count("<script") == 1  # ours only
    assert "<img src=x" not in page and 'onerror="document' not in page and "alert(1)</script>" not in page
    assert "&lt;img src=x onerror=" in page  # shown as text
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page).group(1).replace("&#39;", "'")
    assert f"script-src 'sha256-{digest}'" in csp and "default-src 'none'" in csp and "img-src data:" in csp
    # every <img> is an embedded data URL; nothing refers to the network or the disk
    assert set(re.findall(r'<img src="([a-z]+):', page)) == {"data"}
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_inputs_a_saved_trajectory_results_rows_and_an_eval_folder(tmp_path):
    traj = _trajectory(tmp_path)
    saved = traj.save(tmp_path / "run" / "traj.json")
    (item,) = load_items(saved)
    assert item.trajectory.images[0].startswith(str(tmp_path / "run")) and Path(item.trajectory.images[0]).is_file()
    assert item.prediction == "B" and item.correct is None

    rows = [
        {
            "question_id": 7,
            "benchmark": "vstar",
            "category": "direct_attributes",
            "prediction": "B",
            "answer": "B",
            "correct": True,
            "trajectory": traj.to_dict(),
        },
        {
            "question_id": 8,
            "benchmark": "vstar",
            "category": "relative_position",
            "prediction": "A",
            "correct": False,
            "trajectory": traj.to_dict(),
        },
        {
            "question_id": 9,
            "benchmark": "vstar",
            "category": "relative_position",
            "prediction": None,
            "correct": False,
            "error": "server down",
            "question": "Q9",
        },
    ]
    evaldir = tmp_path / "eval"
    evaldir.mkdir()
    (evaldir / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_items(evaldir)
    assert [i.id for i in items] == ["vstar/7", "vstar/8", "vstar/9"]
    assert [i.correct for i in items] == [True, False, False] and items[1].category == "relative_position"
    assert (items[0].ground_truth, items[0].prediction, items[1].ground_truth) == ("B", "B", None)
    assert items[2].trajectory is None and items[2].error == "server down" and items[2].question == "Q9"
    page = write_report(items, tmp_path / "eval.html").read_text()
    assert page.count('<section class="traj"') == 3 and "server down" in page

    # the CLI module: filters, default output path
    parser = argparse.ArgumentParser()
    report_commands.add_parser(parser.add_subparsers(dest="command"))
    assert report_commands.run(parser.parse_args(["report", str(evaldir), "--only", "wrong"])) == 0
    page = (evaldir / "report.html").read_text()
    assert page.count('<section class="traj"') == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{cut")
    with pytest.raises(ReportError, match=r"bad.jsonl, line 2"):
        load_items(bad)
    with pytest.raises(ReportError, match="not found"):
        load_items(tmp_path / "nope.jsonl")


def test_missing_images_are_named_not_broken(tmp_path):
    traj = _trajectory(tmp_path)
    Path(traj.turns[0].execution["images"][0]).unlink()
    page = write_report([traj], tmp_path / "r.html").read_text()
    assert "output image not shown" in page and page.count("<img ") == 1


# --------------------------------------------------------------------------- Chromium


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")


def _chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=10000",
        *extra,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _body(dom: str) -> dict[str, str]:
    tag = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'([\w-]+)="([^"]*)"', tag))


@pytest.fixture(scope="module")
def corpus_report(tmp_path_factory):
    if not HAVE_CORPUS:
        pytest.skip(f"real corpus not found at {CORPUS}")
    from thyme.agent.replay import replay
    from thyme.sandbox import Sandbox

    d = tmp_path_factory.mktemp("corpus-report")
    with Sandbox() as sandbox:
        summary = replay(CORPUS / "thyme/trajectories.jsonl", sandbox=sandbox, images_root=CORPUS / "thyme", out_path=d / "results.jsonl")
    assert summary.failed == 0
    parser = argparse.ArgumentParser()
    report_commands.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["report", str(d / "results.jsonl"), "--out", str(d / "report.html"), "--records", str(CORPUS / "thyme/trajectories.jsonl")]
    )
    assert report_commands.run(args) == 0
    return d / "report.html"


@needs_corpus
def test_corpus_replay_report_content(corpus_report):
    page = corpus_report.read_text()
    assert page.count('<section class="traj"') == 10
    # the README example: the region really cropped (grown to 64 px) and the one the code asked for
    assert "cropped (1250, 1018, 1360, 1082); the code asked for (1250, 1030, 1360, 1070), repaired by the sandbox" in page
    assert "crop_min_side" in page and '<span class="hll">' in page  # the repaired line is marked in the code
    # correctness from the records' answer_gt: thyme-case-8 answered D for A
    assert re.search(r'data-target="t8" data-correct="wrong"', page)
    assert page.count('data-correct="correct"') >= 2 * 8


@needs_corpus
@needs_chromium
def test_corpus_replay_report_renders_in_chromium(corpus_report, tmp_path):
    page = corpus_report.read_text()
    n_img = page.count("<img ")
    assert n_img == 17  # 9 inputs (thyme-case-7 is text-only) and 8 sandbox outputs (thyme-case-8 wrote no code)
    p = _chromium(tmp_path, corpus_report.as_uri(), "--dump-dom")
    assert p.returncode == 0, p.stderr[-2000:]
    body = _body(p.stdout)
    assert body["data-images-total"] == str(n_img)
    assert body["data-images-loaded"] == str(n_img), "some images did not load"
    assert body["data-shown"] == "10"

    # the filters run in the page: preset from the query string
    p = _chromium(tmp_path, corpus_report.as_uri() + "?correct=wrong", "--dump-dom")
    assert _body(p.stdout)["data-shown"] == "1"
    assert re.search(r'<tr data-item="" data-target="t8"[^>]*>', p.stdout) and not re.search(
        r'<tr data-item="" data-target="t8"[^>]*hidden', p.stdout
    )
    assert re.search(r'<tr data-item="" data-target="t0"[^>]*hidden', p.stdout)
    p = _chromium(tmp_path, corpus_report.as_uri() + "?tool=no", "--dump-dom")
    assert _body(p.stdout)["data-shown"] == "1"

    shot = tmp_path / "report.png"
    p = _chromium(tmp_path, corpus_report.as_uri(), f"--screenshot={shot}", "--window-size=1280,2200", "--hide-scrollbars")
    assert p.returncode == 0 and shot.is_file(), p.stderr[-2000:]
    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1280, 2200)
        assert len(rgb.getcolors(maxcolors=1 << 20) or [0] * (1 << 20)) > 50
        assert max(ImageStat.Stat(rgb).stddev) > 10
    shutil.copy(shot, corpus_report.with_name("report.png"))  # kept beside the report for a look


@needs_chromium
def test_injected_markup_does_not_run_in_chromium(tmp_path):
    out = write_report([_hostile(tmp_path)], tmp_path / "evil.html")
    p = _chromium(tmp_path, out.as_uri(), "--dump-dom")
    assert p.returncode == 0, p.stderr[-2000:]
    body = _body(p.stdout)
    assert "data-pwned" not in body and body["data-images-loaded"] == body["data-images-total"] == "2"
    assert "document.body.dataset.pwned=1" in p.stdout  # visible as text
