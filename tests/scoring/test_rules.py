"""Option extraction by the benchmarks' standard rules, metrics, and `thyme eval score`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

from thyme.evaluate.benchmarks import load_rows
from thyme.cli import main as eval_main
from thyme.evaluate.scoring import extract_option

from ..conftest import CORPUS, REPO, needs_corpus
from ..train.test_rewards import JudgeStub

ANN = CORPUS / "benchmarks" / "annotations"

# --------------------------------------------------------------------------- VLMEvalKit rule (V*, HR-Bench)

HR_OPTIONS = {"A": "27B", "B": "37B", "C": "27D", "D": "27E"}  # HR-Bench 4K question 0


@pytest.mark.parametrize(
    "prediction, letter",
    [
        ("A", "A"),
        ("(A)", "A"),
        ("A.", "A"),
        ("A. 27B", "A"),
        ("D) 27E", "D"),
        ("[C]", "C"),
        ("**A**", "A"),
        ("The answer is A", "A"),
        ("Answer: (B) 37B", "B"),
        ("I choose option C", "C"),
        ("27B", "A"),  # the option's text
        ("It is 37B.", "B"),
        ("The number shown is 27B", "A"),  # text, within twice the options' length
        ("The number displayed above the entrance is 27B", None),  # longer: text matching refused
        ("27B or 37B", None),  # two options' texts
        ("A or B", None),  # two letters
        ("B, C", None),
        ("A man stands at the entrance under the sign", None),  # a leading article is not an answer
        ("a", None),  # letters are case-sensitive
        ("Cannot determine the answer", "Z"),  # refusal
        ("Z", "Z"),
        ("", None),
        (None, None),
        ("<think>x</think><answer>C. 27D</answer>", "C"),  # a whole response: its answer is read
    ],
)
def test_vlmevalkit_option_extraction(prediction, letter):
    assert extract_option(prediction, HR_OPTIONS, "hrbench4k").letter == letter
    assert extract_option(prediction, HR_OPTIONS, "vstar").letter == letter


# --------------------------------------------------------------------------- MME-RealWorld rule

MME_OPTIONS = {"A": "Exavators", "B": "Graders", "C": "Cranes", "D": "Telehandlers", "E": "The image does not feature the number."}


@pytest.mark.parametrize(
    "prediction, letter",
    [
        ("A", "A"),
        ("(D) Telehandlers", "D"),
        ("E. The image does not feature the number.", "E"),
        ("The answer is C", "C"),
        ("The best option is D", "D"),
        ("Best option: A", "A"),  # the original's glued prefixes read this as B (fixed)
        ("Telehandlers", "D"),  # no capital A-E: the option containing the text
        ("graders", "B"),
        ("Cranes", "C"),
        ("Based on the chart, Telehandlers", "B"),  # the rule's known quirk: the first capital A-E
        ("c", "C"),  # "(c) cranes" contains "c"
        ("there are many machines in the picture and none of them is clearly visible to me", None),
        ("It's the second one", None),
        ("", None),  # the original's containment test read an empty answer as A (fixed)
    ],
)
def test_mme_realworld_option_extraction(prediction, letter):
    assert extract_option(prediction, MME_OPTIONS, "mme-realworld").letter == letter
    assert extract_option(prediction, MME_OPTIONS, "mme-realworld-lite").letter == letter


# --------------------------------------------------------------------------- thyme eval score


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _score(*args):
    """Run `thyme eval score` in-process; return (exit status, stdout)."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = eval_main(["eval", "score", *args])
    return rc, buf.getvalue()


@needs_corpus
def test_eval_score_hrbench_cycles_fsp_fcp_without_images(tmp_path):
    rows = load_rows("hrbench4k", ANN / "hrbench_4k.jsonl")
    assert len(rows) == 800 and not os.path.exists(rows[0].image)  # the annotations have no images here
    preds, expect = [], {}
    for i, r in enumerate(rows):
        if i % 97 == 13:
            expect[r.key] = False  # never predicted: counted wrong, listed as missing
            continue
        wrong = next(k for k in r.options if k != r.answer)
        kind = i % 6
        p = {"question_id": r.question_id, "prediction": [f"({r.answer})", f"{r.answer}. {r.options[r.answer]}", "Cannot determine the answer", f"The answer is {wrong}", "no idea", "x"][kind]}
        if kind == 5:
            p["error"] = "backend crashed"
        preds.append(p)
        expect[r.key] = kind in (0, 1)
    f = _write(tmp_path / "predictions.jsonl", preds)
    rc, out = _score("--benchmark", "hrbench4k", "--data", str(ANN / "hrbench_4k.jsonl"), "--predictions", str(f), "--json")
    assert rc == 0
    m = json.loads(out)
    n = len(expect)
    never = [r.key for i, r in enumerate(rows) if i % 97 == 13]
    assert n == 800 and m["counts"]["rows"] == 800 and m["counts"]["missing"] == len(never) == 9 and m["missing"] == never
    assert m["counts"]["correct"] == sum(expect.values())
    assert m["overall"] == pytest.approx(sum(expect.values()) / n)
    assert m["counts"]["failed"] == sum(1 for p in preds if p.get("error"))
    assert m["counts"]["unparsed"] == sum(1 for p in preds if p["prediction"] == "no idea")
    # the standard HR-Bench numbers: accuracy within each option cycle, averaged over the cycles
    by_key = {r.key: r for r in rows}
    cyc = defaultdict(lambda: defaultdict(list))
    for k, ok in expect.items():
        r = by_key[k]
        c = str(int(k) % 4)
        cyc[c]["all"].append(ok)
        cyc[c][r.category].append(ok)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for name, group in (("all", "all"), ("FSP", "single"), ("FCP", "cross")):
        assert m["hrbench"]["average"][name] == pytest.approx(mean([mean(cyc[c][group]) for c in cyc]), abs=1e-6)
    assert m["hrbench"]["num_cycles"] == 4
    assert set(m["per_category"]) == {"single", "cross"}


@needs_corpus
def test_eval_score_mme_realworld_lite_tasks_and_repeated_ids(tmp_path):
    rows = load_rows("mme-realworld-lite", ANN / "MME_RealWorld_Lite.jsonl")
    # lines carry only question_id and prediction; a repeated id's n-th line is its n-th row
    preds = [{"question_id": r.question_id, "prediction": r.answer if r.task == "Perception" else next(k for k in "ABCDE" if k != r.answer)} for r in rows]
    f = _write(tmp_path / "p.jsonl", preds)
    rc, out = _score("--benchmark", "mme-realworld-lite", "--data", str(ANN / "MME_RealWorld_Lite.jsonl"), "--predictions", str(f), "--json")
    m = json.loads(out)
    n_perc = sum(1 for r in rows if r.task == "Perception")
    assert m["counts"]["rows"] == 1919 and m["counts"]["correct"] == n_perc
    mme = m["mme_realworld"]
    assert mme["Perception"]["Avg"] == 1.0 and mme["Reasoning"]["Avg"] == 0.0
    assert mme["Perception"]["count"] + mme["Reasoning"]["count"] == 1919
    assert mme["Overall"] == pytest.approx(n_perc / 1919, abs=1e-6) == m["overall"]
    assert set(mme["Perception"]) >= {"Autonomous_Driving", "Monitoring", "OCR with Complex Context", "Remote Sensing", "Diagram and Table"}
    # categories are lower-cased and attribute categories merged, as the official script does
    assert "vehicle/counting" in mme["Perception"]["Monitoring"] and "Vehicle/counting" not in mme["Perception"]["Monitoring"]
    assert "vehicle/attribute" in mme["Perception"]["Monitoring"]


@needs_corpus
def test_eval_score_vstar_per_category_and_human_output(tmp_path):
    rows = load_rows("vstar", ANN / "vstar_bench.jsonl")
    preds = [{"question_id": r.question_id, "prediction": f"({r.answer}) {r.options[r.answer]}" if r.category == "direct_attributes" else "(Z)"} for r in rows]
    f = _write(tmp_path / "p.jsonl", preds)
    out_json = tmp_path / "m.json"
    rc, out = _score("--benchmark", "vstar", "--data", str(ANN / "vstar_bench.jsonl"), "--predictions", str(f), "--out", str(out_json))
    m = json.loads(out_json.read_text())
    assert m["per_category"]["direct_attributes"] == {"accuracy": 1.0, "correct": 115, "total": 115}
    assert m["per_category"]["relative_position"] == {"accuracy": 0.0, "correct": 0, "total": 76}
    assert m["overall"] == pytest.approx(115 / 191, abs=1e-6)
    assert "overall: 0.6021 (115/191)" in out and "direct_attributes: 1.0000 (115/115)" in out


@needs_corpus
def test_eval_score_judge_maps_unparsed_answers_only(tmp_path):
    rows = load_rows("vstar", ANN / "vstar_bench.jsonl")[:3]
    preds = [
        {"question_id": rows[0].question_id, "prediction": f"({rows[0].answer})"},
        {"question_id": rows[1].question_id, "prediction": "the first one you listed"},
        {"question_id": rows[2].question_id, "prediction": "hmm"},
    ]
    f = _write(tmp_path / "p.jsonl", preds)

    def reply(body):
        prompt = body["messages"][0]["content"]
        return (200, json.dumps({"option": rows[1].answer})) if "the first one you listed" in prompt else (500, "down")

    s = JudgeStub([reply])
    cfg = tmp_path / "judge.yaml"
    cfg.write_text("judge:\n  backoff_s: 0.01\n  max_retries: 2\n")
    try:
        rc, out = _score("--benchmark", "vstar", "--data", str(ANN / "vstar_bench.jsonl"), "--predictions", str(f), "--json", "--judge-base-url", s.url, "--judge-model", "j", "--config", str(cfg))
    finally:
        s.close()
    m = json.loads(out)
    prompts = [q["body"]["messages"][0]["content"] for q in s.requests]
    assert not any(f"({rows[0].answer})" in p.split("Model answer:")[1] for p in prompts)  # parsed answers never go to the judge
    assert m["counts"]["unparsed"] == 2 and m["counts"]["judged"] == 1 and m["counts"]["judge_invalid"] == 1
    # every data row counts: 188 never predicted are wrong, so 2 correct of 191
    assert m["counts"]["correct"] == 2 and m["counts"]["rows"] == 191 and m["counts"]["missing"] == 188
    assert m["overall"] == pytest.approx(2 / 191, abs=1e-6)
    assert m["provenance"]["judge"]["model"] == "j"
    assert sum(1 for p in prompts if "hmm" in p) == 3  # the failing verdict was retried (max_retries 2 from the YAML)


@needs_corpus
def test_eval_score_clear_errors(tmp_path, capsys):
    f = _write(tmp_path / "p.jsonl", [{"question_id": "nope", "prediction": "A"}])
    assert eval_main(["eval", "score", "--benchmark", "vstar", "--data", str(ANN / "vstar_bench.jsonl"), "--predictions", str(f)]) == 2
    assert "no prediction of" in capsys.readouterr().err
    assert eval_main(["eval", "score", "--benchmark", "mmbench", "--data", str(ANN / "vstar_bench.jsonl"), "--predictions", str(f)]) == 2
    assert "unknown benchmark 'mmbench'" in capsys.readouterr().err
    assert eval_main(["eval", "score", "--benchmark", "vstar", "--data", str(tmp_path / "missing.tsv"), "--predictions", str(f)]) == 2
    assert "benchmark data file not found" in capsys.readouterr().err


@needs_corpus
def test_thyme_eval_score_command_line(tmp_path):
    """The command as a user types it."""
    rows = load_rows("hrbench4k", ANN / "hrbench_4k.jsonl")[:8]
    f = _write(tmp_path / "p.jsonl", [{"question_id": r.question_id, "prediction": r.answer} for r in rows])
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "thyme.cli"]
    data = tmp_path / "hrbench_first8.jsonl"  # every data row counts in `overall`: score against these 8
    data.write_text("".join((ANN / "hrbench_4k.jsonl").read_text().splitlines(keepends=True)[:8]))
    p = subprocess.run([*cmd, "eval", "score", "--benchmark", "hrbench4k", "--data", str(data), "--predictions", str(f), "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    m = json.loads(p.stdout)
    assert m["overall"] == 1.0 and m["counts"]["rows"] == 8 and list(m)[:3] == ["overall", "per_category", "counts"]
