"""`thyme data verify`: sandbox execution filtering of SFT records, on `thyme replay`."""

from __future__ import annotations

import json
import os
import subprocess
import sys


from thyme.data.verify import expected_outputs, judge, texts_match, verify
from thyme.data.records import parse_sft_record
from thyme.sandbox import Sandbox

from ..conftest import CORPUS, REPO, corpus_records, needs_corpus


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "thyme.cli", "data", *args], capture_output=True, text=True, env=env, timeout=300)


def code(src: str) -> str:
    return f"<code>\n```python\n{src}\n```\n</code>"


def rec(rid: str, *rounds: tuple[str, str], answer: str = "x") -> dict:
    """A text-only record: each round is (code, recorded sandbox text)."""
    body = "<think>"
    for src, out in rounds:
        body += "Let me compute.\n" + code(src) + f"\n<sandbox_output>{out}</sandbox_output>\n"
    return {"id": rid, "image": [], "question": "Compute it.", "response": body + f"Done.</think>\n<answer>{answer}</answer>"}


@needs_corpus
def test_corpus_without_reference_outputs_is_checked_against_the_record_itself(tmp_path):
    records = tmp_path / "corpus.jsonl"
    with records.open("w") as f:
        for r in corpus_records():
            r = dict(r)
            r.pop("reference_outputs")
            r["image"] = [str(CORPUS / "thyme" / p) for p in r["image"]]
            f.write(json.dumps(r) + "\n")
    p = run_cli("verify", str(records), "--json", "--allow-absolute-paths")  # the images live outside the records' folder
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert (s["records"], s["kept"], s["rejected"]) == (10, 9, 1)
    rejected = [json.loads(l) for l in (tmp_path / "corpus.rejected.jsonl").read_text().splitlines()]
    # the shipped input of case 5 is 851 px wide, its recorded output 848: the code keeps the input's size
    assert rejected[0]["id"] == "thyme-case-5"
    assert rejected[0]["rejection"] == {"reason": "image_mismatch", "detail": "expected image(s) 848x377, got 851x377", "block": 1}
    kept = [json.loads(l) for l in (tmp_path / "corpus.kept.jsonl").read_text().splitlines()]
    assert {k["id"] for k in kept} == {r["id"] for r in corpus_records()} - {"thyme-case-5"}
    originals = {r["id"]: r for r in corpus_records()}
    assert all(k["response"] == originals[k["id"]]["response"] for k in kept)

    # a rerun resumes: nothing is executed or written again
    p2 = run_cli("verify", str(records), "--json", "--allow-absolute-paths")
    s2 = json.loads(p2.stdout.strip().splitlines()[-1])
    assert (s2["records"], s2["resumed"]) == (0, 10)
    assert len((tmp_path / "corpus.kept.jsonl").read_text().splitlines()) == 9


@needs_corpus
def test_reference_outputs_take_precedence():
    r = next(x for x in corpus_records() if x["id"] == "thyme-case-5")
    exp = expected_outputs(parse_sft_record(r, images_root=CORPUS / "thyme"))
    assert [(e.kind, e.sizes) for e in exp] == [("images", [[851, 377]])]


def test_each_rejection_reason(tmp_path):
    lines = [
        rec("good", ("print(6 * 7)", "42")),
        rec("wrong-text", ("print(6 * 7)", "41")),
        rec("crash", ("print(1 / 0)", "5")),
        rec("fixed-in-round-2", ("print(undefined_name)", "NameError: name 'undefined_name' is not defined"), ("print(3)", "3")),
        rec("should-have-failed", ("print(3)", "NameError: name 'x' is not defined")),
        rec("float", ("print(0.1 + 0.2)", "0.3")),
        {"id": "no-code", "image": [], "question": "q", "response": "<think>easy</think>\n<answer>1</answer>"},
        {"id": "broken", "image": [], "question": "q"},
    ]
    records = tmp_path / "r.jsonl"
    records.write_text("".join(json.dumps(x) + "\n" for x in lines) + "{not json\n")
    kept, rejected = tmp_path / "k.jsonl", tmp_path / "x.jsonl"
    with Sandbox() as sandbox:
        s = verify(records, sandbox=sandbox, kept_path=kept, rejected_path=rejected)
    assert (s.records, s.kept, s.rejected) == (9, 4, 5)
    assert {json.loads(l)["id"] for l in kept.read_text().splitlines()} == {"good", "fixed-in-round-2", "float", "no-code"}
    rej = {json.loads(l).get("id", "line"): json.loads(l)["rejection"] for l in rejected.read_text().splitlines()}
    assert rej["wrong-text"]["reason"] == "text_mismatch" and "'41'" in rej["wrong-text"]["detail"]
    assert rej["crash"] == {"reason": "code_error", "detail": "ZeroDivisionError: division by zero", "block": 1}
    assert rej["should-have-failed"]["reason"] == "unexpected_success"
    assert rej["broken"]["reason"] == "record_error" and "'response'" in rej["broken"]["detail"]
    assert rej["line"]["reason"] == "record_error" and "invalid JSON" in rej["line"]["detail"]
    assert s.reasons == {"text_mismatch": 1, "code_error": 1, "unexpected_success": 1, "record_error": 2}


def test_text_comparison_and_judging_units():
    assert texts_match("0.44745897697122117", "0.4474589769712212")
    assert texts_match("a  = 1\nb=2", "a = 1 b=2")
    assert not texts_match("0.45", "0.44")
    assert not texts_match("yes", "no")
    from thyme.data.verify import Expected

    assert judge([Expected("text", text="1"), Expected("text", text="2")], [{"ok": True, "stdout": "1"}])["reason"] == "rounds_mismatch"
    assert judge([Expected("unknown")], [{"ok": False}]) is None
    assert judge([Expected("text", text="1")], [{"ok": False, "timed_out": True}])["reason"] == "timeout"
