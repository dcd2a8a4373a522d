"""Threat class "Path trust" (docs/threat-model.md; issue 15): a path in a record, a dataset row, a
benchmark row or a predictions file may be absolute, climb out of its root with ``..``, or go
through a symlink in the images folder. Every reader of paths from data resolves them by
:func:`thyme.records.resolve_data_path`: such paths are refused with a per-record error naming the
path, the rest of the batch is processed, and the host file never reaches an output; with
``--allow-absolute-paths`` (``allow_absolute_paths``) the user opts in.

The "secret" is a valid PNG outside the data's folder (so any reader that followed the path
would happily decode, copy or embed it) carrying a unique marker; no output may hold the marker,
the file's bytes, or their base64.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from thyme.errors import RecordError, ThymeError
from thyme.records import PathRefused, resolve_data_path

# --------------------------------------------------------------------------- fixtures


class Setup:
    """``root/`` (the data folder, with ``images/good.png`` and ``images/link.png`` -> secret) and
    ``outside/secret.png``; ``paths``: the three hostile spellings of the secret."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.root = tmp / "root"
        (self.root / "images").mkdir(parents=True)
        (tmp / "outside").mkdir()
        self.marker = f"SECRET-{uuid.uuid4().hex}"
        info = PngImagePlugin.PngInfo()
        info.add_text("secret", self.marker)
        self.secret = tmp / "outside" / "secret.png"
        Image.new("RGB", (23, 17), "purple").save(self.secret, pnginfo=info)
        os.chmod(self.secret, 0o600)
        self.secret_bytes = self.secret.read_bytes()
        self.good = self.root / "images" / "good.png"
        Image.new("RGB", (32, 24), "green").save(self.good)
        os.symlink(self.secret, self.root / "images" / "link.png")
        self.paths = {"absolute": str(self.secret), "dotdot": "../outside/secret.png", "symlink": "images/link.png"}

    def assert_no_leak(self, *places: Path) -> None:
        """No file under ``places`` holds the marker, the secret's bytes or their base64."""
        b64 = base64.b64encode(self.secret_bytes)
        checked = 0
        for place in places:
            files = [place] if place.is_file() else [p for p in place.rglob("*") if p.is_file() and not p.is_symlink()]
            for f in files:
                data = f.read_bytes()
                checked += 1
                assert self.marker.encode() not in data, f"{f} holds the secret's marker"
                assert self.secret_bytes not in data and b64 not in data, f"{f} holds the secret's bytes"
        assert checked, "nothing was checked"


@pytest.fixture
def s(tmp_path) -> Setup:
    return Setup(tmp_path)


def _answer_record(rid: str, image: str, answer: str = "A", **kw) -> dict:
    return {
        "id": rid,
        "image": [image],
        "question": "<image>\nWhat colour?",
        "response": f"<think>Look.</think>\n<answer>{answer}</answer>",
        **kw,
    }


# --------------------------------------------------------------------------- the rule itself


def test_the_rule_refuses_every_way_out_and_accepts_what_stays_inside(s):
    good = resolve_data_path("images/good.png", s.root)
    assert good == os.path.realpath(s.good)
    assert resolve_data_path(str(s.good), s.root) == good  # an absolute path inside the root is fine
    assert resolve_data_path("images/../images/good.png", s.root) == good
    for how, p in s.paths.items():
        with pytest.raises(PathRefused) as e:
            resolve_data_path(p, s.root, where="record on line 7")
        msg = str(e.value)
        assert "record on line 7" in msg and p in msg and str(s.root) in msg and "--allow-absolute-paths" in msg, (how, msg)
        assert resolve_data_path(p, s.root, allow_absolute=True) == os.path.realpath(s.secret)
    with pytest.raises(RecordError, match="NUL"):
        resolve_data_path("images/good.png\x00x", s.root)
    with pytest.raises(RecordError, match="non-empty string"):
        resolve_data_path(["x"], s.root)


# --------------------------------------------------------------------------- replay


def test_replay_refuses_each_hostile_record_and_replays_the_good_one(s):
    from thyme.agent import AgentConfig
    from thyme.agent.replay import replay

    records = s.root / "records.jsonl"
    recs = [_answer_record(f"bad-{how}", p) for how, p in s.paths.items()] + [_answer_record("good", "images/good.png")]
    records.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = s.tmp / "run" / "results.jsonl"
    summary = replay(records, out_path=out, config=AgentConfig())
    rows = {r["id"] or r["line"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert (summary.trajectories, summary.failed) == (4, 3)
    good = next(r for r in rows.values() if r.get("id") == "good")
    assert good["ok"] and good["answer_match"]
    errors = [f["error"] for f in summary.failures]
    for (how, p), line in zip(s.paths.items(), (1, 2, 3)):
        err = next(e for e in errors if f"line {line}" in e)
        assert p in err and "refused" in err and "--allow-absolute-paths" in err, (how, err)
    s.assert_no_leak(s.tmp / "run")

    # opted in: the absolute path is accepted
    one = s.root / "one.jsonl"
    one.write_text(json.dumps(_answer_record("abs", s.paths["absolute"])) + "\n")
    assert replay(one, config=AgentConfig(), allow_absolute_paths=True).failed == 0


def test_replay_cli_flag(s):
    from thyme.cli import main

    records = s.root / "r.jsonl"
    records.write_text(json.dumps(_answer_record("abs", s.paths["absolute"])) + "\n")
    assert main(["replay", str(records), "--json"]) == 1
    assert main(["replay", str(records), "--json", "--allow-absolute-paths"]) == 0


# --------------------------------------------------------------------------- data verify


def test_verify_rejects_each_hostile_record_and_verifies_the_good_ones(s):
    from thyme.data.verify import verify

    records = s.root / "sft.jsonl"
    code = "<code>\n```python\nprint(6 * 7)\n```\n</code>\n<sandbox_output>42</sandbox_output>\n"
    recs = [_answer_record(f"bad-{how}", p) for how, p in s.paths.items()]
    recs.append(
        {
            "id": "good-code",
            "image": ["images/good.png"],
            "question": "<image>\nCompute.",
            "response": "<think>Compute.\n" + code + "Done.</think>\n<answer>42</answer>",
        }
    )
    recs.append(_answer_record("good-plain", str(s.good)))  # absolute, but inside the records' folder
    records.write_text("".join(json.dumps(r) + "\n" for r in recs))
    kept, rejected = s.tmp / "v" / "kept.jsonl", s.tmp / "v" / "rejected.jsonl"
    summary = verify(records, kept_path=kept, rejected_path=rejected)
    assert (summary.records, summary.kept, summary.rejected) == (5, 2, 3)
    assert {json.loads(l)["id"] for l in kept.read_text().splitlines()} == {"good-code", "good-plain"}
    rej = {r["id"]: r["rejection"] for r in map(json.loads, rejected.read_text().splitlines())}
    for how, p in s.paths.items():
        assert (
            rej[f"bad-{how}"]["reason"] == "record_error" and p in rej[f"bad-{how}"]["detail"] and "refused" in rej[f"bad-{how}"]["detail"]
        )
    s.assert_no_leak(s.tmp / "v")


# --------------------------------------------------------------------------- eval: benchmark rows, --replay, predictions -> report


def _vstar_rows(path: Path, images: list[str]) -> Path:
    rows = [
        {"question_id": f"q{i}", "image": img, "question": "What colour?", "options": ["A. green", "B. purple"], "answer": "A"}
        for i, img in enumerate(images)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_benchmark_rows_naming_host_files_are_refused_before_any_model_loads(s):
    from thyme.evaluate.benchmarks import MissingImagesError, check_images, load_rows

    data = _vstar_rows(s.root / "vstar.jsonl", ["images/good.png", *s.paths.values()])
    rows = load_rows("vstar", data)
    assert rows[0].image == os.path.realpath(s.good)
    with pytest.raises(MissingImagesError) as e:
        check_images(rows, images_root=None, data=data)
    msg = str(e.value)
    assert "3 of 4 image path(s)" in msg and "--allow-absolute-paths" in msg
    for i, p in enumerate(s.paths.values(), 1):
        assert f"question q{i}:" in msg and p in msg
    assert all(r.image is None for r in rows[1:])
    opted = load_rows("vstar", data, allow_absolute=True)
    check_images(opted, images_root=None, data=data)
    assert {r.image for r in opted[1:]} == {os.path.realpath(s.secret)}


def test_a_parquet_benchmark_image_struct_path_is_refused(s):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from thyme.evaluate.benchmarks import MissingImagesError, check_images, load_rows, materialise_images

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "index": ["q0", "q1"],
            "question": ["What colour?"] * 2,
            "A": ["green"] * 2,
            "B": ["purple"] * 2,
            "answer": ["A", "A"],
            "image": pa.array([{"bytes": None, "path": "images/good.png"}, {"bytes": None, "path": str(s.secret)}], type=struct),
        }
    )
    data = s.root / "vstar.parquet"
    pq.write_table(table, data)
    rows = load_rows("vstar", data)
    materialise_images(rows, data, s.tmp / "cache")
    assert rows[0].image == os.path.realpath(s.good)
    with pytest.raises(MissingImagesError, match="1 of 2 image path"):
        check_images(rows, images_root=None, data=data)


def test_eval_replay_refuses_the_hostile_record_and_runs_the_others(s):
    from thyme.evaluate.runner import EvalConfig, run_eval

    data = _vstar_rows(s.root / "vstar.jsonl", ["images/good.png"] * 4)
    records = s.root / "records.jsonl"
    recs = [_answer_record(f"bad-{how}", p, benchmark="vstar", question_id=f"q{i}") for i, (how, p) in enumerate(s.paths.items())]
    recs.append(_answer_record("good", "images/good.png", benchmark="vstar", question_id="q3"))
    records.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = s.tmp / "eval"
    res = run_eval(EvalConfig(benchmark="vstar", data=str(data), out=str(out), replay=str(records), report=False))
    preds = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(p["question_id"], p["correct"], p["error"]) for p in preds] == [("q3", True, None)]
    refused = res.metrics["provenance"]["replay"]["refused_records"]
    assert [r["id"] for r in refused] == ["bad-absolute", "bad-dotdot", "bad-symlink"]
    for r, p in zip(refused, s.paths.values()):
        assert p in r["error"] and f"line {r['line']}" in r["error"]
    s.assert_no_leak(out)


def test_report_embeds_only_files_of_the_run_it_renders(s):
    from thyme.cli import main

    run = s.root / "run"
    run.mkdir()
    Image.new("RGB", (30, 20), "green").save(run / "in.png")

    def traj(rid: str, image: str) -> dict:
        return {"id": rid, "question": "q", "images": [image], "turns": [], "answer": "A", "stop_reason": "answer"}

    rows = [{"question_id": "good", "prediction": "A", "trajectory": traj("good", str(run / "in.png"))}]
    rows += [
        {"question_id": how, "prediction": "A", "trajectory": traj(how, p if os.path.isabs(p) else str(run / ".." / p))}
        for how, p in s.paths.items()
    ]
    rows.append({"question_id": "link-in-run", "prediction": "A", "trajectory": traj("link-in-run", str(run / "link.png"))})
    os.symlink(s.secret, run / "link.png")
    preds = run / "predictions.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = s.tmp / "page" / "report.html"
    assert main(["report", str(preds), "--out", str(page)]) == 0
    html = page.read_text()
    assert html.count("data:image/") == 1  # the run's own image only
    assert html.count("not embedded: outside the folder of the run") >= 4
    s.assert_no_leak(page)
    assert main(["report", str(preds), "--out", str(page), "--force", "--allow-absolute-paths"]) == 0
    assert page.read_text().count("data:image/") == 5  # opted in: every spelling of the host file is shown


# --------------------------------------------------------------------------- data convert


def test_convert_refuses_host_paths_and_non_images_and_keeps_modes(s):
    from thyme.data.convert import ConvertConfig, convert

    (s.root / "images" / "notes.png").write_text("this is text, renamed .png\n")
    rows = [{"id": f"bad-{how}", "image": [p], "question": "<image>\nq", "response": "a"} for how, p in s.paths.items()]
    rows.append({"id": "text-as-png", "image": ["images/notes.png"], "question": "<image>\nq", "response": "a"})
    rows.append({"id": "good", "image": ["images/good.png"], "question": "<image>\nq", "response": "a"})
    src = s.root / "sft.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.chmod(s.good, 0o640)
    out = s.tmp / "conv" / "out.jsonl"
    summary = convert(str(src), out, ConvertConfig(workers=2))
    assert (summary.written, summary.failed) == (1, 4)
    errors = {e["id"]: e["error"] for e in map(json.loads, out.with_name("out.errors.jsonl").read_text().splitlines())}
    for how, p in s.paths.items():
        assert p in errors[f"bad-{how}"] and "refused" in errors[f"bad-{how}"]
    assert "not an accepted, decodable image" in errors["text-as-png"]
    rec = json.loads(out.read_text())
    copied = Path(rec["image"][0])
    assert copied.read_bytes() == s.good.read_bytes()
    assert copied.stat().st_mode & 0o777 == 0o640  # never more than its source allowed
    images = [p for p in (s.tmp / "conv").rglob("*") if p.is_file() and p.suffix in (".png", ".img")]
    assert images == [copied]  # nothing of the refused rows, nor the text file, was copied
    s.assert_no_leak(s.tmp / "conv")

    out2 = s.tmp / "conv2" / "out.jsonl"
    assert convert(str(src), out2, ConvertConfig(allow_absolute_paths=True)).written == 4  # the text file still fails


def test_convert_refuses_a_parquet_image_struct_path(s):
    import datasets

    from thyme.data.convert import ConvertConfig, convert

    features = datasets.Features(
        {
            "image": datasets.Sequence(datasets.Image(decode=False)),
            "question": datasets.Value("string"),
            "response": datasets.Value("string"),
        }
    )
    cols = {
        "image": [[{"bytes": None, "path": str(s.secret)}], [{"bytes": None, "path": "images/good.png"}]],
        "question": ["<image>\nq", "<image>\nq"],
        "response": ["a", "b"],
    }
    src = s.root / "data.parquet"
    datasets.Dataset.from_dict(cols, features=features).to_parquet(str(src))
    os.chmod(src, 0o600)
    out = s.tmp / "pq" / "out.jsonl"
    summary = convert(str(src), out, ConvertConfig())
    assert (summary.written, summary.failed) == (1, 1)
    err = json.loads(out.with_name("out.errors.jsonl").read_text())
    assert str(s.secret) in err["error"] and "refused" in err["error"]
    s.assert_no_leak(s.tmp / "pq")


def test_convert_embedded_images_keep_the_data_files_privacy(s):
    from thyme.data.convert import ConvertConfig, convert

    b64 = base64.b64encode(s.good.read_bytes()).decode()
    src = s.root / "private.jsonl"
    src.write_text(json.dumps({"id": "e", "image": [b64], "question": "<image>\nq", "response": "a"}) + "\n")
    os.chmod(src, 0o600)
    out = s.tmp / "priv" / "out.jsonl"
    assert convert(str(src), out, ConvertConfig()).written == 1
    copied = Path(json.loads(out.read_text())["image"][0])
    assert copied.stat().st_mode & 0o777 == 0o600


# --------------------------------------------------------------------------- SFT


def test_sft_index_drops_each_hostile_record_and_keeps_the_good_one(s, tiny_checkpoint):
    from thyme.backends.processors import load_processor
    from thyme.data.masks import MaskConfig, prepare_processor
    from thyme.train.collator import ThymeSFTCollator, build_index

    mask = MaskConfig(max_pixels=12544)
    processor = prepare_processor(load_processor(tiny_checkpoint), mask)
    records = s.root / "sft.jsonl"
    recs = [_answer_record(f"bad-{how}", p) for how, p in s.paths.items()] + [_answer_record("good", "images/good.png")]
    records.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cols, stats = build_index([str(records)], processor, mask, model=str(tiny_checkpoint), show_progress=False)
    assert cols["id"] == ["good"] and stats.malformed == 3
    text = " ".join(stats.examples)
    for p in s.paths.values():
        assert p in text
    assert any("outside the images root" in reason for reason in stats.reasons)
    # the collator reads the kept record by the same rule; a line swapped for a hostile one after indexing is refused
    collator = ThymeSFTCollator(processor, mask, [str(records)])
    assert collator([{"file": 0, "offset": cols["offset"][0]}])["input_ids"].shape[0] == 1
    with pytest.raises(PathRefused):
        collator([{"file": 0, "offset": 0}])
    cols2, _ = build_index([str(records)], processor, mask, model=str(tiny_checkpoint), show_progress=False, allow_absolute_paths=True)
    assert "bad-absolute" in cols2["id"]


# --------------------------------------------------------------------------- RL train files


def test_rl_train_file_names_every_bad_line_before_the_model_loads(s):
    from thyme.train.rl.data import load_prompts, rl_record

    def rec(rid: str, image: str) -> str:
        r = rl_record("What colour?", str(s.good), "green", rid=rid)
        r["images"] = [image]
        return json.dumps(r)

    lines = [rec(f"bad-{how}", p) for how, p in s.paths.items()] + ["{not json", rec("good", "images/good.png")]
    f = s.root / "rl.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ThymeError) as e:
        load_prompts([str(f)])
    msg = str(e.value)
    assert "4 bad line(s)" in msg
    for n, p in zip((1, 2, 3), s.paths.values()):
        assert f"{f}:{n}:" in msg and p in msg
    assert f"{f}:4:" in msg and "invalid JSON" in msg and "AttributeError" not in msg
    # the good line and, opted in, the hostile ones load
    f.write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    prompts = load_prompts([str(f)], allow_absolute_paths=True)
    assert [p.id for p in prompts] == ["bad-absolute", "bad-dotdot", "bad-symlink", "good"]
    assert prompts[-1].images == [os.path.realpath(s.good)]


def test_rl_invalid_json_line_alone_names_the_line(s):
    from thyme.train.rl.data import load_prompts

    f = s.root / "rl.jsonl"
    f.write_text('{"question": "q", "answer": "A"}\n{"question": \n')
    with pytest.raises(ThymeError, match=r"rl\.jsonl:2: .*invalid JSON"):
        load_prompts([str(f)])


def test_eval_images_decoded_from_a_private_tsv_stay_private(s):
    from thyme.evaluate.benchmarks import load_rows, materialise_images

    b64 = base64.b64encode(s.good.read_bytes()).decode()
    tsv = s.root / "vstar.tsv"
    tsv.write_text("index\tquestion\tA\tB\tanswer\timage\n" + f"0\tWhat colour?\tgreen\tpurple\tA\t{b64}\n")
    os.chmod(tsv, 0o600)
    rows = load_rows("vstar", tsv)
    materialise_images(rows, tsv, s.tmp / "cache")
    assert Path(rows[0].image).read_bytes() == s.good.read_bytes()
    assert os.stat(rows[0].image).st_mode & 0o777 == 0o600


# --------------------------------------------------------------------------- data annotate (issue 19)


def test_annotate_export_and_import_refuse_paths_leaving_their_root(s):
    """Export: a symlink in the images folder and list-file lines (absolute, ``..``) naming the
    secret are left out as "outside the folder"; import: a task whose ``thyme_image`` names it is
    a ``bad_task``; neither output holds the secret."""
    from thyme.data.annotate import AnnotateConfig, export_annotation, import_annotations
    from thyme.data.labelstudio import choices_result, rectangle_result, text_result

    cfg = AnnotateConfig(min_long_side=16)
    out = s.tmp / "ls"
    summary = export_annotation(s.root / "images", out, cfg)
    skipped = {r["file"]: r["reason"] for r in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    assert skipped == {"link.png": "outside the folder"} and summary.tasks == 1
    lst = s.root / "list.txt"
    lst.write_text("\n".join([s.paths["absolute"], s.paths["dotdot"], s.paths["symlink"], "images/good.png"]) + "\n")
    summary = export_annotation(lst, s.tmp / "ls2", cfg)
    reasons = [json.loads(l)["reason"] for l in (s.tmp / "ls2" / "skipped.jsonl").read_text().splitlines()]
    assert reasons == ["outside the folder"] * 3 and summary.tasks == 1
    s.assert_no_leak(out, s.tmp / "ls2")

    result = [
        rectangle_result("box", "image", (1, 1, 4, 4), (32, 24), "target"),
        text_result("question", "image", "q?"),
        text_result("answer", "image", "a"),
        choices_result("category", "image", "object"),
    ]
    ann = {"id": 1, "completed_by": 1, "result": result}
    tasks = [{"id": i, "data": {"thyme_image": p}, "annotations": [ann]} for i, p in enumerate(s.paths.values())]
    tasks.append({"id": 9, "data": {"thyme_image": "images/good.png"}, "annotations": [ann]})
    (s.tmp / "export.json").write_text(json.dumps(tasks))
    r = import_annotations(s.tmp / "export.json", s.tmp / "rl.jsonl", cfg=AnnotateConfig(max_area=0.5), images_root=s.root)
    rejected = [json.loads(l) for l in (s.tmp / "rl.rejected.jsonl").read_text().splitlines()]
    assert r.kept == 1 and [x["reason"] for x in rejected] == ["bad_task"] * 3
    assert all("refused" in x["detail"] for x in rejected)
    s.assert_no_leak(s.tmp / "rl.jsonl", s.tmp / "rl.rejected.jsonl")
