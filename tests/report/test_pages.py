"""The report's pages with plots: an eval folder's summary, two eval folders compared, RL training curves."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from thyme.cli import report as report_commands
from thyme.report import ReportError, write_comparison, write_summary, write_training
from thyme.report.pages import row_facts

from .test_report import _body, _chromium, _trajectory, needs_chromium

# question -> (category, rounds / tool use, stop reason); run A and run B differ on q2 (A right,
# B wrong) and q3 (A wrong, B right)
QUESTIONS = {
    1: ("direct_attributes", True, "answer"),
    2: ("direct_attributes", True, "answer"),
    3: ("relative_position", False, "answer"),
    4: ("relative_position", False, "max_rounds"),
}
CORRECT = {"A": {1: True, 2: True, 3: False, 4: False}, "B": {1: True, 2: False, 3: True, 4: False}}


def _eval_folder(tmp_path: Path, run: str) -> Path:
    """A folder shaped as ``thyme eval --out`` writes it (predictions.jsonl rows of
    thyme.evaluate.runner.prediction_row, trajectories with paths relative to the folder)."""
    d = tmp_path / f"run-{run}"
    d.mkdir()
    rows = []
    for q, (cat, tool, stop) in QUESTIONS.items():
        traj = _trajectory(d, tid=f"{run}{q}", question=f"Question {q}?")
        if not tool:
            traj.turns = traj.turns[1:]
        traj.answer = f"{run}-answer-{q}"
        traj.stop_reason = stop
        traj.timings = {"total_s": 1.5 * q + (run == "B"), "generate_s": 1.0}
        for t in traj.turns:
            t.num_tokens = 40 * q
        td = traj.to_dict()
        td["images"] = [Path(p).name for p in td["images"]]  # relative to the run folder, as eval writes them
        for t in td["turns"]:
            if t.get("execution"):
                t["execution"]["images"] = [Path(p).name for p in t["execution"]["images"]]
        rows.append(
            {
                "question_id": q,
                "key": f"vstar/{q}",
                "benchmark": "vstar",
                "category": cat,
                "answer_gt": "B",
                "prediction": traj.answer,
                "correct": CORRECT[run][q],
                "error": None,
                "stop_reason": stop,
                "rounds": len(traj.turns),
                "code_blocks": int(tool),
                "tool_used": tool,
                "question": traj.question,
                "trajectory": td,
            }
        )
    (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    k = sum(CORRECT[run].values())
    per_cat = {}
    for c in ("direct_attributes", "relative_position"):
        qs = [q for q in QUESTIONS if QUESTIONS[q][0] == c]
        n = sum(CORRECT[run][q] for q in qs)
        per_cat[c] = {"accuracy": n / len(qs), "correct": n, "total": len(qs)}
    metrics = {
        "overall": k / 4,
        "per_category": per_cat,
        "counts": {"rows": 4, "correct": k, "wrong": 4 - k, "failed": 0, "unparsed": 0},
        "missing": [],
        "benchmark": "vstar",
        "tool_use_rate": 0.5,
        "mean_rounds": 1.5,
        "provenance": {"model": f"model-{run}", "backend": "replay"},
    }
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    report_commands.add_parser(parser.add_subparsers(dest="command"))
    return report_commands.run(parser.parse_args(["report", *argv]))


def _plots(page: str) -> list[str]:
    return re.findall(r'<figure class="plot"><img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="([^"]*)"', page)


def test_plot_labels_from_the_data_are_text():
    from thyme.report.plots import bars, lines

    # mathtext markup and unbalanced dollars in a category name would make matplotlib raise
    p = bars("Accuracy by $category", ["$\\frac{$", "a" * 200, "<b>x</b>"], {"acc": [0.5, None, 1.0]}, percent=True)
    assert p.url.startswith("data:image/png;base64,") and len(p.url) > 2000
    assert lines("$x", {"$y^": ([1, 2], [float("nan"), 1.0])}).url.startswith("data:image/png;base64,")


def test_row_facts_of_a_prediction_row(tmp_path):
    row = json.loads((_eval_folder(tmp_path, "A") / "predictions.jsonl").read_text().splitlines()[3])
    f = row_facts(row)
    assert f == {
        "correct": False,
        "category": "relative_position",
        "rounds": 1,
        "tool": False,
        "stop": "max_rounds",
        "latency_s": 6.0,
        "tokens": 160,
    }
    # hostile / partial rows: no crash, nothing invented
    f = row_facts({"correct": "yes", "rounds": "many", "trajectory": {"turns": [{"index": 0, "num_tokens": "x"}], "timings": []}})
    assert (f["correct"], f["rounds"], f["tool"], f["latency_s"], f["tokens"], f["category"]) == (None, 1, False, None, None, "(none)")


def test_summary_of_an_eval_folder_beside_evals_report(tmp_path):
    d = _eval_folder(tmp_path, "A")
    (d / "report.html").write_text('<meta name="thyme-source" content="thyme eval x">')  # eval's own report
    assert _cli(str(d)) == 0  # the README's example: no longer refused
    assert (d / "report.html").read_text() == '<meta name="thyme-source" content="thyme eval x">'  # left as eval wrote it
    page = (d / "summary.html").read_text()
    assert _plots(page) == [
        "Accuracy by category",
        "Accuracy by number of rounds",
        "Accuracy with and without tool use",
        "Stop reasons",
        "Latency per question",
        "Generated tokens per question",
    ]
    assert "<td>direct_attributes</td><td>100.0%</td><td>2/2</td>" in page and "<td>relative_position</td><td>0.0%</td><td>0/2</td>" in page
    assert '<a href="report.html">' in page and "model-A" in page
    assert _cli(str(d)) == 0  # rerun: its own page is overwritten
    # the trajectory report of the folder is still there on request, and still refuses eval's
    with pytest.raises(ReportError, match="was written by `thyme eval x`"):
        _cli(str(d), "--trajectories")
    # without timings the latency plot is left out, not drawn empty
    rows = [json.loads(x) for x in (d / "predictions.jsonl").read_text().splitlines()]
    for r in rows:
        r["trajectory"]["timings"] = {}
    (d / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{cut\n")
    page = write_summary(d, tmp_path / "s2.html").read_text()
    assert "Latency per question" not in _plots(page) and len(_plots(page)) == 5
    assert "unreadable prediction lines (skipped)</th><td>1<" in page


def test_comparison_lists_the_flipped_questions(tmp_path):
    a, b = _eval_folder(tmp_path, "A"), _eval_folder(tmp_path, "B")
    assert _cli(str(a), str(b)) == 0
    out = tmp_path / "compare-run-A-vs-run-B.html"
    page = out.read_text()
    assert _plots(page) == ["Accuracy by category"]
    # overall 50% vs 50%, per category 100 -> 50 and 0 -> 50
    assert '<td>overall</td><td>4</td><td>50.0%</td><td>50.0%</td><td class="">+0.0</td>' in page
    assert '<td>direct_attributes</td><td>2</td><td>100.0%</td><td>50.0%</td><td class="down">-50.0</td>' in page
    assert '<td>relative_position</td><td>2</td><td>0.0%</td><td>50.0%</td><td class="up">+50.0</td>' in page
    assert "right -&gt; wrong: 1 question" in page and "wrong -&gt; right: 1 question" in page
    assert page.count('<section class="traj"') == 4  # both runs' trajectories of the 2 flipped questions

    # a row naming a file outside both runs: listed, its image not embedded (paths in data)
    secret = _image_outside(tmp_path)
    rows = [json.loads(x) for x in (b / "predictions.jsonl").read_text().splitlines()]
    rows[2]["trajectory"]["images"] = [secret]
    (b / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = write_comparison(a, b, tmp_path / "c.html").read_text()
    assert f"input image not shown: {secret} (not embedded: outside the folder of the run" in page
    assert page.count("<img ") == out.read_text().count("<img ") - 1

    # another benchmark does not compare
    m = json.loads((b / "metrics.json").read_text())
    (b / "metrics.json").write_text(json.dumps({**m, "benchmark": "hrbench4k"}))
    with pytest.raises(ReportError, match="same benchmark"):
        write_comparison(a, b, tmp_path / "c.html")
    with pytest.raises(ReportError, match="not an eval output folder"):
        write_comparison(a, tmp_path, tmp_path / "c.html")


def _image_outside(tmp_path: Path) -> str:
    p = tmp_path / "elsewhere" / "secret.png"
    p.parent.mkdir()
    Image.new("RGB", (20, 20), "red").save(p)
    return str(p)


def _rl_folder(tmp_path: Path) -> Path:
    d = tmp_path / "rl-out"
    (d / "checkpoint-2").mkdir(parents=True)
    hist = []
    for s in (1, 2, 3):
        hist.append(
            {
                "step": s,
                "loss": 0.1 * s,
                "reward": 0.2 * s,
                "thyme/rewards/format": 1.0,
                "thyme/rewards/result": 0.1 * s,
                "thyme/rewards/consistency": 0.5,
                "thyme/tool_use_rate": 0.25 * s,
                "thyme/code_execution_rate": 0.9,
                "thyme/rounds": 1.0 + s,
                "completions/mean_length": 100.0 + s,
                "thyme/masked_rollouts": float(s - 1),
            }
        )
    hist.append({"train_runtime": 12.0, "step": 3})  # the end-of-training entry
    (d / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"log_history": hist[:2]}))
    (d / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": hist}))
    traj = _trajectory(d, tid="r").to_dict()
    rows = []
    for s in (1, 2, 3):
        for g in range(2):
            rows.append(
                {
                    "step": s,
                    "id": f"q{g}",
                    "group": g,
                    "trajectory": traj,
                    "reward": {"format": 1.0, "result": float(g), "consistency": 0.5, "total": 1.0 + g},
                    "advantage": 0.0,
                    "mask_reason": ("truncated" if s == 2 and g == 0 else "sandbox_error" if s == 3 and g == 1 else None),
                    "stop_reason": "answer",
                    "model_tokens": 50 * s,
                    "sandbox_tokens": 10,
                    "images": 1,
                }
            )
    (d / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_training_curves_from_the_logs_and_rollouts(tmp_path):
    d = _rl_folder(tmp_path)
    assert _cli(str(d)) == 0
    page = (d / "training.html").read_text()
    titles = ["Reward and its components", "Tool use", "Rounds per rollout", "Response length", "Loss", "Masked rollouts per step"]
    assert _plots(page) == titles
    assert "<th>logged steps</th><td>3</td>" in page and "<th>masked rollouts</th><td>2</td>" in page
    assert str(d / "trainer_state.json") in page  # the folder's state, not the older checkpoint's
    # from rollouts.jsonl alone (a run stopped before TRL wrote its state): the same curves
    (d / "trainer_state.json").unlink()
    for c in (d / "checkpoint-2").iterdir():
        c.unlink()
    page = write_training(d, tmp_path / "t2.html").read_text()
    assert _plots(page) == [t for t in titles if t != "Loss"]  # the loss is only in the log
    # an SFT output folder: the loss curve only
    sft = tmp_path / "sft-out"
    sft.mkdir()
    (sft / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": s, "loss": 2.0 / s} for s in (1, 2, 3)]}))
    assert _cli(str(sft)) == 0 and _plots((sft / "training.html").read_text()) == ["Loss"]
    (d / "rollouts.jsonl").write_text("")
    with pytest.raises(ReportError, match="no training steps"):
        write_training(d, tmp_path / "t3.html")


# --------------------------------------------------------------------------- Chromium


def _renders(tmp_path: Path, out: Path, n_img: int) -> str:
    p = _chromium(tmp_path, out.as_uri(), "--dump-dom")
    assert p.returncode == 0, p.stderr[-2000:]
    dom = p.stdout
    body = _body(dom)
    assert body["data-images-total"] == str(n_img) and body["data-images-loaded"] == str(n_img), "some images did not load"
    shot = tmp_path / (out.stem + ".png")
    p = _chromium(tmp_path, out.as_uri(), f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars")
    assert p.returncode == 0 and shot.is_file(), p.stderr[-2000:]
    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        assert len(rgb.getcolors(maxcolors=1 << 20) or [0] * (1 << 20)) > 50 and max(ImageStat.Stat(rgb).stddev) > 10
    return dom


@needs_chromium
def test_summary_and_training_pages_render_in_chromium(tmp_path):
    d = _eval_folder(tmp_path, "A")
    assert _cli(str(d)) == 0
    _renders(tmp_path, d / "summary.html", 6)
    r = _rl_folder(tmp_path)
    assert _cli(str(r)) == 0
    _renders(tmp_path, r / "training.html", 6)


@needs_chromium
def test_comparison_links_open_the_right_trajectories_in_chromium(tmp_path):
    a, b = _eval_folder(tmp_path, "A"), _eval_folder(tmp_path, "B")
    out = write_comparison(a, b, tmp_path / "cmp.html")
    # 1 plot + per rendered trajectory: its input image and its sandbox output (tool-using) or input only
    n_img = out.read_text().count("<img ")
    assert n_img == 1 + (2 + 2) + (1 + 1)  # q2 used a tool in both runs, q3 in neither
    dom = _renders(tmp_path, out, n_img)
    sections = {m.group(1): m.group(0) for m in re.finditer(r'<section class="traj" id="([^"]+)"[^>]*>.*?</section>', dom, re.S)}
    flips = dict(re.findall(r'<table class="index flipped" data-direction="([^"]+)">(.*?)</table>', dom, re.S))
    assert set(flips) == {"right -&gt; wrong", "wrong -&gt; right"}
    expected = {"right -&gt; wrong": ("vstar/2", "Question 2?"), "wrong -&gt; right": ("vstar/3", "Question 3?")}
    for direction, table in flips.items():
        key, question = expected[direction]
        (row,) = re.findall(r'<tr data-key="([^"]+)">(.*?)</tr>', table, re.S)
        assert row[0] == key
        for cls, run, correct in (("to-a", "A", direction.startswith("right")), ("to-b", "B", not direction.startswith("right"))):
            target = re.search(rf'<a class="{cls}" href="#([^"]+)">([^<]*)</a>', row[1])
            sec = sections[target.group(1)]  # the link's target exists in the page
            assert f'data-key="{key}"' in sec and f'data-run="run-{run}"' in sec
            assert question in sec and f"{run}-answer-{key[-1]}" in sec and target.group(2) == f"{run}-answer-{key[-1]}"
            assert f'data-correct="{"correct" if correct else "wrong"}"' in sec


@needs_chromium
def test_two_real_eval_runs_summary_and_comparison_in_chromium(tmp_path):
    """Folders written by the eval runner itself (hrbench rows, a scripted model that measures the
    image in the sandbox): A answers question 0 right and 1 wrong, B the other way round."""
    from thyme.evaluate.runner import EvalConfig, run_eval

    from ..evaluate.test_benchmark_data import hrbench_tsv
    from ..evaluate.test_runner import Scripted, measuring_script

    tsv = hrbench_tsv(tmp_path / "hr.tsv")
    runs = {}
    for name, first in (("a", "A"), ("b", "B")):
        script = measuring_script({(64, 48): first, (80, 40): "C"})
        cfg = EvalConfig(benchmark="hrbench4k", data=str(tsv), out=str(tmp_path / name), concurrency=1, report=False)
        runs[name] = run_eval(cfg, backend_factory=lambda s=script: Scripted(s)).out
    preds = {
        n: {json.loads(x)["key"]: json.loads(x)["correct"] for x in (d / "predictions.jsonl").read_text().splitlines()}
        for n, d in runs.items()
    }
    assert (preds["a"]["0"], preds["b"]["0"], preds["a"]["1"], preds["b"]["1"]) == (True, False, False, True)

    assert _cli(str(runs["a"])) == 0
    page = (runs["a"] / "summary.html").read_text()
    # a scripted model reports no token counts: that histogram is left out
    assert _plots(page) == [
        "Accuracy by category",
        "Accuracy by number of rounds",
        "Accuracy with and without tool use",
        "Stop reasons",
        "Latency per question",
    ]
    _renders(tmp_path, runs["a"] / "summary.html", 5)

    assert _cli(str(runs["a"]), str(runs["b"])) == 0
    out = tmp_path / "compare-a-vs-b.html"
    n_img = out.read_text().count("<img ")
    assert n_img == 1 + 2 * 2  # the plot; 2 flipped questions x 2 runs x the input image (the code only prints)
    dom = _renders(tmp_path, out, n_img)
    sections = {m.group(1): m.group(0) for m in re.finditer(r'<section class="traj" id="([^"]+)"[^>]*>.*?</section>', dom, re.S)}
    flips = dict(re.findall(r'<table class="index flipped" data-direction="([^"]+)">(.*?)</table>', dom, re.S))
    for direction, key in (("right -&gt; wrong", "0"), ("wrong -&gt; right", "1")):
        (row,) = re.findall(r'<tr data-key="([^"]+)">(.*?)</tr>', flips[direction], re.S)
        assert row[0] == key
        for cls, run in (("to-a", "a"), ("to-b", "b")):
            target = re.search(rf'<a class="{cls}" href="#([^"]+)">([^<]*)</a>', row[1]).group(1)
            sec = sections[target]
            assert f'data-key="{key}"' in sec and f'data-run="{run}"' in sec
            want = "correct" if preds[run][key] else "wrong"
            assert f'data-correct="{want}"' in sec


def test_hostile_inputs_make_pages_not_crashes(tmp_path):
    a, b = _eval_folder(tmp_path, "A"), _eval_folder(tmp_path, "B")
    rows = [json.loads(x) for x in (a / "predictions.jsonl").read_text().splitlines()]
    # 200 distinct categories and round counts, odd types everywhere, a malformed trajectory
    for i in range(200):
        rows.append({"key": f"vstar/x{i}", "category": f"cat-{i}", "rounds": i, "correct": i % 2 == 0, "trajectory": {"turns": 7}})
    rows[1]["trajectory"] = {"turns": [{"index": "zero"}], "stop_reason": ["x"]}
    rows.append({"key": "vstar/big", "rounds": 1e300, "correct": True, "trajectory": {"timings": {"total_s": float("1e308")}}})
    (a / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "[1, 2]\n")
    m = json.loads((a / "metrics.json").read_text())
    (a / "metrics.json").write_text(json.dumps({**m, "per_category": [1, 2], "counts": "many", "mean_rounds": "x"}))
    from thyme.report.pages import MAX_BARS, _group

    groups = _group([row_facts(r) for r in rows], "category")
    assert len(groups) == MAX_BARS and groups[-1][0] == "other" and sum(len(v) for _, v in groups) == len(rows)
    page = write_summary(a, tmp_path / "s.html").read_text()
    assert len(_plots(page)) == 6 and "unreadable prediction lines (skipped)</th><td>1<" in page
    page = write_comparison(a, b, tmp_path / "c.html").read_text()  # vstar/2 flipped; its A trajectory cannot be read
    assert "right -&gt; wrong: 1 question" in page and "malformed trajectory" in page
    (a / "metrics.json").write_text("[]")
    with pytest.raises(ReportError, match="not a metrics file"):
        write_summary(a, tmp_path / "s.html")
