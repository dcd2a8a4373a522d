"""Threat-model class "caller-side bombs, before any sandbox" (issue 15).

The caller runs as root and decodes images and parses JSON from files it does not trust: a
benchmark TSV (base64) or JSONL (paths), records, predictions, train files. Here:

- a PNG of a few KB claiming 30000x30000 (and one of 12000x12000, under the pixel budget but a
  ratio bomb) goes through every caller-side decode reachable from a command: refused by
  :mod:`thyme.imageio` from its header with an :class:`ImageBudgetError` naming the file, its
  size and the setting that raises the budget; no pixel decoded (PIL's ``load`` never runs on
  it; the command's peak memory stays small); the other rows/records go on;
- concurrent decodes stay within the process-wide decode budget;
- JSONL lines of 50 MiB and nested 100000 deep in replay, verify, eval score and RL train
  files: a per-record error naming the line (:mod:`thyme.jsonl`), the good records before and
  after processed, the documented exit status, no traceback.

Peak memory is the child command's own high-water mark (``VmHWM``, a fresh process): a 1-bit 12000x12000 image decodes to 137 MiB (576 MiB as RGB), 30000x30000
to 858 MiB; the commands run in ~40-70 MiB.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from thyme.errors import ImageError, ThymeError
from thyme.imageio import ImageBudgetError, configure_images, decode_budget_peak, image_size, open_image, open_image_bytes
from thyme.jsonl import JsonInputError, iter_jsonl, loads_bounded

from ..conftest import REPO, png_1bit
from ..evaluate.test_benchmark_data import write_tsv

#: Peak RSS a refused command may reach (measured: 40-70 MiB); a decode of either bomb (at least
#: 137 MiB on top), or a 50 MiB line held and parsed whole (bytes + str + value: 150 MiB on top),
#: goes above it.
RSS_BOUND_MIB = 160

#: Runs the CLI and prints its peak RSS: /proc's VmHWM, the high-water mark of this process's
#: own memory since exec (``ru_maxrss`` would carry the forking pytest process's).
_MEASURE = (
    "import sys\n"
    "from thyme.cli import main\n"
    "try:\n"
    "    rc = main(sys.argv[1:])\n"
    "finally:\n"
    "    hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
    "    print('THYME_TEST_MAXRSS_KB', hwm[0], file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``thyme ARGS`` in a fresh process; returns it and its peak RSS in MiB."""
    e = dict(os.environ, PYTHONPATH=str(REPO / "src"), **(env or {}))
    p = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, cwd=cwd, env=e, timeout=600)
    kb = [int(line.split()[1]) for line in p.stderr.splitlines() if line.startswith("THYME_TEST_MAXRSS_KB")]
    assert kb, p.stderr
    return p, kb[-1] / 1024


# --------------------------------------------------------------------------- bombs


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bombs")
    out = {"huge": d / "huge.png", "ratio": d / "ratio.png"}
    out["huge"].write_bytes(png_1bit(30000, 30000))  # 900 Mpx from ~110 KB
    out["ratio"].write_bytes(png_1bit(12000, 12000))  # 144 Mpx (under 150) from ~18 KB: the ratio refuses it
    return out


def _local(folder: Path, bomb: Path) -> Path:
    """A copy of ``bomb`` inside ``folder``: data paths must stay inside their root (threat class
    "path trust"), so a bomb reaches the image checks only from the data's own folder."""
    dst = folder / bomb.name
    dst.write_bytes(bomb.read_bytes())
    return dst


def _good(path: Path, color="red", size=(64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _assert_clear(msg: str, name: str, dims: str, key: str) -> None:
    assert name in msg and dims in msg and key in msg and "refused before decoding" in msg, msg
    assert "Traceback" not in msg


# --------------------------------------------------------------------------- the one image opener


def test_open_image_refuses_bombs_from_the_header_for_files_and_bytes(bombs, no_decode):
    with pytest.raises(ImageBudgetError) as e:
        open_image(bombs["huge"])
    _assert_clear(str(e.value), str(bombs["huge"]), "30000x30000", "THYME_IMAGE_MAX_PIXELS")
    with pytest.raises(ImageBudgetError) as e:
        image_size(bombs["ratio"])  # header-only callers are refused too
    _assert_clear(str(e.value), "ratio.png", "12000x12000", "THYME_IMAGE_MAX_RATIO")
    with pytest.raises(ImageBudgetError) as e:
        open_image_bytes(bombs["huge"].read_bytes(), name="<base64 image of question 7>")
    _assert_clear(str(e.value), "question 7", "30000x30000", "max_pixels")
    assert isinstance(e.value, ImageError) and isinstance(e.value, ThymeError)
    assert no_decode == []  # nothing decoded


def test_each_budget_refuses_alone_and_raising_it_lets_the_image_through(tmp_path, no_decode):
    small = tmp_path / "s.png"
    small.write_bytes(png_1bit(2000, 2000))  # 4 MB decoded in mode 1, 16 MB as RGB, ~600 bytes encoded
    with pytest.raises(ImageBudgetError, match=r"2000x2000 1 \(4.0 Mpx.*above the budget of 3.0 Mpx \(max_pixels\)"):
        open_image(small, max_pixels=3_000_000)
    with pytest.raises(ImageBudgetError, match=r"15 MiB decoded.*\(max_bytes\)"):
        open_image(small, mode="RGB", max_bytes=10 << 20)  # the converted copy counts
    try:
        configure_images({"ratio_floor_bytes": 1 << 20})
        with pytest.raises(ImageBudgetError, match=r"ratio of \d+x, above 1000x \(max_ratio\)"):
            open_image(small)
        assert no_decode == []
        im = open_image(small, max_ratio=1e9)  # the same file within a raised budget decodes
        assert im.size == (2000, 2000) and no_decode == [(2000, 2000)]
    finally:
        configure_images(None)
    assert open_image(small, mode="RGB").mode == "RGB"  # defaults: a 4 Mpx image is fine


def test_environment_raises_a_budget_and_a_bad_value_is_a_clear_error(tmp_path, bombs):
    code = "from thyme.imageio import image_size; import sys; print(image_size(sys.argv[1]))"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), THYME_IMAGE_MAX_RATIO="1e9")
    p = subprocess.run([sys.executable, "-c", code, str(bombs["ratio"])], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and "(12000, 12000)" in p.stdout, p.stderr
    env["THYME_IMAGE_MAX_PIXELS"] = "lots"
    p = subprocess.run([sys.executable, "-c", code, str(bombs["ratio"])], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode != 0 and "THYME_IMAGE_MAX_PIXELS='lots' is not a number" in p.stderr


def test_concurrent_decodes_stay_within_the_decode_budget(tmp_path, monkeypatch):
    """The rule: concurrent decodes hold at most decode_budget_bytes; a bigger one decodes alone."""
    import time

    from thyme.agent.preflight import check_images_decode

    paths = [_good(tmp_path / f"i{k}.png", (k * 30 % 255, 0, 0), (600, 600)) for k in range(8)]  # 600*600*4 = 1.44 MB each
    one = 600 * 600 * 4
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self, *a, **k: (time.sleep(0.05), real(self, *a, **k))[1])
    try:
        configure_images({"decode_budget_bytes": int(2.5 * one)})
        decode_budget_peak(reset=True)
        check_images_decode(paths, workers=8)
        assert one <= decode_budget_peak() <= 2.5 * one
        configure_images({"decode_budget_bytes": one // 2})  # each image exceeds the budget: one at a time
        decode_budget_peak(reset=True)
        check_images_decode(paths, workers=8)
        assert decode_budget_peak() == one
    finally:
        configure_images(None)


# --------------------------------------------------------------------------- thyme eval


def _hrbench_rows(image_values: list[str]) -> list[dict]:
    q = "What is written on the sign?"
    return [
        {
            "index": i,
            "question": q,
            "A": "a",
            "B": "b",
            "C": "c",
            "D": "d",
            "answer": "A",
            "category": "single",
            "cycle_category": "0",
            "image": v,
        }
        for i, v in enumerate(image_values)
    ]


def _b64_file(p: Path) -> str:
    return base64.b64encode(p.read_bytes()).decode()


def test_eval_up_front_check_refuses_a_base64_bomb_row_before_loading_the_model(tmp_path, bombs):
    good = _good(tmp_path / "g.png")
    header = ["index", "question", "A", "B", "C", "D", "answer", "category", "cycle_category", "image"]
    tsv = write_tsv(tmp_path / "hr.tsv", header, _hrbench_rows([_b64_file(good), _b64_file(bombs["ratio"]), _b64_file(good)]))
    p, rss = cli(
        "eval", "--benchmark", "hrbench4k", "--data", str(tsv), "--model", "no-such-owner/no-such-model", "--out", str(tmp_path / "o")
    )
    assert p.returncode == 2, p.stderr
    _assert_clear(p.stderr, "1.png", "12000x12000", "THYME_IMAGE_MAX_RATIO")  # the row's cached image, named by its index
    assert "no-such-model" not in p.stderr  # before the model
    assert rss < RSS_BOUND_MIB, rss


def test_eval_up_front_check_refuses_a_path_bomb_row(tmp_path, bombs):
    good = _good(tmp_path / "imgs" / "g.png")
    rows = [
        {
            "question_id": str(i),
            "image": str(n),
            "question": "Left or right?",
            "options": "(A) left\n(B) right",
            "category": "relative_position",
            "answer": "A",
        }
        for i, n in enumerate([good, _local(tmp_path, bombs["huge"]), _local(tmp_path, bombs["ratio"])])
    ]
    data = tmp_path / "vstar.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p, rss = cli(
        "eval", "--benchmark", "vstar", "--data", str(data), "--model", "no-such-owner/no-such-model", "--out", str(tmp_path / "o")
    )
    assert p.returncode == 2, p.stderr
    _assert_clear(p.stderr, "huge.png", "30000x30000", "THYME_IMAGE_MAX_PIXELS")
    assert "1 more image(s) fail too" in p.stderr and "no-such-model" not in p.stderr
    assert rss < RSS_BOUND_MIB, rss


class _Canned(BaseHTTPRequestHandler):
    """A chat-completions server answering every request with ``<answer>A</answer>``."""

    def do_GET(self):  # noqa: N802
        self._send({"object": "list", "data": []})

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send(
            {
                "id": "x",
                "object": "chat.completion",
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "<answer>A</answer>"},
                        "text": "<answer>A</answer>",
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
            }
        )

    def _send(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def canned_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    finally:
        srv.shutdown()
        srv.server_close()


def test_eval_with_an_openai_server_fails_only_the_bomb_question(tmp_path, bombs, canned_server):
    """The OpenAI backend's resize (encode_image) is the decode here: the bomb's question fails
    with the clear error, the others are answered; exit 1 (failed questions) as documented."""
    good = _good(tmp_path / "g.png")
    header = ["index", "question", "A", "B", "C", "D", "answer", "category", "cycle_category", "image"]
    control = write_tsv(tmp_path / "control.tsv", header, _hrbench_rows([_b64_file(good), _b64_file(good)]))
    c, control_rss = cli(
        "eval",
        "--benchmark",
        "hrbench4k",
        "--data",
        str(control),
        "--base-url",
        canned_server,
        "--model",
        "m",
        "--out",
        str(tmp_path / "c"),
        "--no-report",
    )
    assert c.returncode == 0, c.stderr  # this path loads the agent's stack: ~390 MiB here
    tsv = write_tsv(tmp_path / "hr.tsv", header, _hrbench_rows([_b64_file(good), _b64_file(bombs["ratio"]), _b64_file(good)]))
    out = tmp_path / "o"
    p, rss = cli(
        "eval",
        "--benchmark",
        "hrbench4k",
        "--data",
        str(tsv),
        "--base-url",
        canned_server,
        "--model",
        "m",
        "--out",
        str(out),
        "--no-report",
    )
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    preds = {json.loads(line)["question_id"]: json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()}
    assert set(preds) == {"0", "1", "2"}
    assert preds["0"]["prediction"] == "A" and preds["2"]["prediction"] == "A" and not preds["0"].get("error")
    _assert_clear(preds["1"]["error"], "1.png", "12000x12000", "max_ratio")
    assert rss < control_rss + 100, (rss, control_rss)  # the resize would decode 137 MiB and convert to 549 MiB of RGB


def test_openai_encode_image_refuses_before_decoding(bombs, no_decode):
    from thyme.backends.openai import encode_image

    with pytest.raises(ImageBudgetError, match="12000x12000"):
        encode_image(str(bombs["ratio"]))
    with pytest.raises(ImageBudgetError, match="30000x30000"):
        encode_image("file://" + str(bombs["huge"]))
    assert no_decode == []


# --------------------------------------------------------------------------- RL, SFT, report


def test_rl_train_image_check_refuses_the_bomb_naming_it(tmp_path, bombs, no_decode):
    from thyme.train.rl.data import check_prompt_images, load_prompts, rl_record

    good = _good(tmp_path / "g.png")
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(
            json.dumps(rl_record("Which colour?", str(p), "red", rid=f"r{k}")) + "\n"
            for k, p in enumerate([good, _local(tmp_path, bombs["ratio"]), good])
        )
    )
    prompts = load_prompts([str(train)])
    assert [p.id for p in prompts] == ["r0", "r1", "r2"]
    with pytest.raises(ImageBudgetError) as e:  # before the model loads (thyme train rl's check_images)
        check_prompt_images(prompts)
    _assert_clear(str(e.value), "ratio.png", "12000x12000", "THYME_IMAGE_MAX_RATIO")
    assert (12000, 12000) not in no_decode


def test_sft_image_reads_refuse_the_bomb(bombs, no_decode):
    from thyme.data.masks import image_token_counts

    class _IP:
        def get_number_of_image_patches(self, h, w, kw):
            return (h // 14) * (w // 14)

    class _Proc:
        image_processor = _IP()

    for from_header in (True, False):
        with pytest.raises(ImageBudgetError, match="12000x12000"):
            image_token_counts(_Proc(), [str(bombs["ratio"])], from_header=from_header)
    assert no_decode == []


def test_report_thumbnail_of_a_bomb_is_a_problem_and_the_other_images_embed(tmp_path, bombs, no_decode):
    from thyme.report.render import _Embedder

    good = _good(tmp_path / "g.png")
    embed = _Embedder(max_side=256, roots=[str(tmp_path)])  # the run's folder
    bad = embed(str(_local(tmp_path, bombs["huge"])))
    assert bad.url is None and "30000x30000" in bad.problem and "refused before decoding" in bad.problem
    ok = embed(str(good))
    assert ok.url and ok.url.startswith("data:image/")
    assert (30000, 30000) not in no_decode


# --------------------------------------------------------------------------- replay / verify records


def _record(rid: str, image: str) -> dict:
    return {"id": rid, "image": [image], "question": "<image>\nWhat colour is it?", "response": "<think>Red.</think>\n<answer>red</answer>"}


def test_replay_fails_only_the_records_with_bomb_images(tmp_path, bombs):
    _good(tmp_path / "g.png")
    recs = tmp_path / "r.jsonl"
    recs.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                _record("a", "g.png"),
                _record("huge", _local(tmp_path, bombs["huge"]).name),
                _record("ratio", _local(tmp_path, bombs["ratio"]).name),
                _record("b", "g.png"),
            ]
        )
    )
    p, rss = cli("replay", str(recs), "--images-root", str(tmp_path), "--json", "--out", str(tmp_path / "out.jsonl"))
    assert p.returncode == 1, p.stderr  # records failed: exit 1
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert (s["trajectories"], s["failed"], s["answers_match"]) == (4, 2, 2)
    errs = {f["id"]: f["error"] for f in s["failures"]}
    _assert_clear(errs["huge"], "huge.png", "30000x30000", "THYME_IMAGE_MAX_PIXELS")
    _assert_clear(errs["ratio"], "ratio.png", "12000x12000", "THYME_IMAGE_MAX_RATIO")
    assert "Traceback" not in p.stderr and rss < RSS_BOUND_MIB, rss


def test_verify_rejects_a_record_whose_recorded_output_is_a_bomb(tmp_path, bombs):
    good = _good(tmp_path / "g.png")
    code = "<code>\n```python\nprint(1)\n```\n</code>"
    with_out = dict(
        _record("bomb-out", str(good)),
        image=[str(good), str(_local(tmp_path, bombs["huge"]))],
        response=f"<think>Crop.\n{code}<sandbox_output><image></sandbox_output>Red.</think>\n<answer>red</answer>",
    )
    recs = tmp_path / "v.jsonl"
    recs.write_text("".join(json.dumps(r) + "\n" for r in [_record("a", str(good)), with_out, _record("b", str(good))]))
    p, rss = cli("data", "verify", str(recs), "--json")
    assert p.returncode == 0, p.stderr  # verify's rejections are its output, not a failure
    rejected = [json.loads(line) for line in (tmp_path / "v.rejected.jsonl").read_text().splitlines()]
    by_id = {r.get("id"): r["rejection"] for r in rejected}
    assert by_id["bomb-out"]["reason"] == "record_error"
    _assert_clear(by_id["bomb-out"]["detail"], "huge.png", "30000x30000", "max_pixels")
    assert "Traceback" not in p.stderr and rss < RSS_BOUND_MIB, rss


# --------------------------------------------------------------------------- JSON: the one bounded reader


BIG = 50 << 20
DEEP = 100_000


def _hostile_jsonl(path: Path, good_before: dict, good_after: dict, id_key: str = "id") -> Path:
    with path.open("wb") as f:
        f.write(json.dumps(good_before).encode() + b"\n")
        f.write(b'{"' + id_key.encode() + b'": "big", "s": "' + b"x" * BIG + b'"}\n')  # line 2: 50 MiB
        f.write(b'{"' + id_key.encode() + b'": "deep", "x": ' + b"[" * DEEP + b"]" * DEEP + b"}\n")  # line 3: 100000 deep
        f.write(json.dumps(good_after).encode() + b"\n")
    return path


def test_loads_bounded_and_iter_jsonl_turn_every_failure_into_one_error(tmp_path):
    for text, why in [
        ("[" * DEEP + "]" * DEEP, "nested 100000 levels deep"),
        ('{"a": [1, 2', "invalid JSON"),
        ("1" * 10000, "cannot parse JSON"),
        (b"\xff\xfe", "not UTF-8"),
    ]:
        with pytest.raises(JsonInputError, match=why) as e:
            loads_bounded(text, what="reply of the judge")
        assert isinstance(e.value, ValueError) and str(e.value).startswith("reply of the judge: ")
    with pytest.raises(JsonInputError, match=r"19 bytes, over the limit of 10 \(max_line_bytes\)"):
        loads_bounded('{"a": "0123456789"}', max_bytes=10)
    assert loads_bounded('{"a": "[[[[{{{{\\"", "b": [[1]]}', max_depth=3) == {
        "a": '[[[[{{{{"',
        "b": [[1]],
    }  # brackets in strings do not count
    with pytest.raises(JsonInputError, match="nested 3 levels deep"):
        loads_bounded('{"a": "[[[[{{{{\\"", "b": [[1]]}', max_depth=2)
    # escaped quotes after an unterminated one: the depth scan stays linear (a backtracking
    # string pattern took minutes on this 400 KB line) and the line is refused as too deep
    with pytest.raises(JsonInputError, match="nested 300 levels deep"):
        loads_bounded("[" * 300 + '"' + '\\"' * 200_000)
    p = _hostile_jsonl(tmp_path / "x.jsonl", {"id": "a"}, {"id": "b"})
    got = list(iter_jsonl(p))
    assert [n for n, _ in got] == [1, 2, 3, 4]
    assert got[0][1] == {"id": "a"} and got[3][1] == {"id": "b"}
    assert "line 2" in got[1][1].message and "longer than" in got[1][1].message
    assert "line 3" in got[2][1].message and "nested 100001 levels deep" in got[2][1].message


def test_replay_reports_the_huge_and_deep_lines_and_replays_the_others(tmp_path):
    _good(tmp_path / "g.png")
    recs = _hostile_jsonl(tmp_path / "r.jsonl", _record("a", "g.png"), _record("b", "g.png"))
    p, rss = cli("replay", str(recs), "--images-root", str(tmp_path), "--json", "--out", str(tmp_path / "out.jsonl"))
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr and "RecursionError" not in p.stderr
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert (s["trajectories"], s["failed"], s["answers_match"]) == (4, 2, 2)
    errs = {f["line"]: f["error"] for f in s["failures"]}
    assert "longer than" in errs[2] and "max_line_bytes" in errs[2]
    assert "nested" in errs[3] and "max_depth" in errs[3]
    assert rss < RSS_BOUND_MIB, rss


def test_verify_rejects_the_huge_and_deep_lines_and_keeps_the_others(tmp_path):
    good = _good(tmp_path / "g.png")
    recs = _hostile_jsonl(tmp_path / "v.jsonl", _record("a", str(good)), _record("b", str(good)))
    p, rss = cli("data", "verify", str(recs), "--json")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert (s["records"], s["kept"], s["rejected"]) == (4, 2, 2)
    rejected = {r["line"]: r["rejection"] for r in map(json.loads, (tmp_path / "v.rejected.jsonl").read_text().splitlines())}
    assert "line 2" in rejected[2]["detail"] and "longer than" in rejected[2]["detail"]
    assert "line 3" in rejected[3]["detail"] and "nested" in rejected[3]["detail"]
    assert rss < RSS_BOUND_MIB, rss


def test_eval_score_names_the_bad_lines_and_scores_the_others(tmp_path):
    rows = [
        {
            "question_id": str(i),
            "image": "x.png",
            "question": "Left or right?",
            "options": "(A) left\n(B) right",
            "category": "relative_position",
            "answer": "A",
        }
        for i in range(4)
    ]
    data = tmp_path / "vstar.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preds = _hostile_jsonl(
        tmp_path / "predictions.jsonl",
        {"question_id": "0", "prediction": "A"},
        {"question_id": "3", "prediction": "A"},
        id_key="question_id",
    )
    p, rss = cli("eval", "score", "--benchmark", "vstar", "--data", str(data), "--predictions", str(preds), "--json")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert "line 2 of" in p.stderr and "longer than" in p.stderr and "line 3 of" in p.stderr and "nested" in p.stderr
    m = json.loads(p.stdout.strip().splitlines()[-1])
    assert m["counts"]["correct"] == 2 and m["missing"] == ["1", "2"]
    assert rss < RSS_BOUND_MIB, rss


def test_rl_train_file_with_a_huge_or_deep_line_is_a_clear_error_naming_it(tmp_path):
    from thyme.train.rl.data import load_prompts, rl_record

    good = _good(tmp_path / "g.png")
    for bad, why in [
        (b'{"s": "' + b"x" * (20 << 20) + b'"}', "longer than"),
        (b"[" * DEEP + b"]" * DEEP, "nested"),
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "expected a JSON object"),
    ]:
        train = tmp_path / "train.jsonl"
        train.write_bytes(json.dumps(rl_record("q?", str(good), "a", rid="r0")).encode() + b"\n" + bad + b"\n")
        with pytest.raises(ThymeError) as e:
            load_prompts([str(train)])
        assert "2" in e.value.message and why in e.value.message, e.value.message


def test_sft_index_skips_a_huge_line_unread_and_drops_a_deep_one_as_invalid_json(tmp_path):
    from thyme.jsonl import parse_line
    from thyme.train.collator import _drop_reason, _iter_offsets

    p = _hostile_jsonl(tmp_path / "sft.jsonl", {"id": "a"}, {"id": "b"})
    rows = list(_iter_offsets(str(p)))
    assert [n for n, _, _ in rows] == [1, 2, 3, 4]
    assert rows[1][2] is None  # 50 MiB: not read into memory
    with p.open("rb") as f:
        f.seek(rows[3][1])
        assert json.loads(f.readline()) == {"id": "b"}  # offsets stay right after the skipped line
    for _, _, line in rows[1:3]:
        with pytest.raises(JsonInputError) as e:
            parse_line(line, what="record")
        assert _drop_reason(e.value) == "invalid JSON"


def test_the_config_files_images_section_sets_the_budgets(tmp_path):
    _good(tmp_path / "g.png")  # 64x48 = 3072 px
    recs = tmp_path / "r.jsonl"
    recs.write_text(json.dumps(_record("a", "g.png")) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("images: {max_pixels: 1000}\n")
    p, _ = cli("replay", str(recs), "--images-root", str(tmp_path), "--json", "--config", str(cfg))
    assert p.returncode == 1, p.stderr
    err = json.loads(p.stdout.strip().splitlines()[-1])["failures"][0]["error"]
    assert "64x48" in err and "budget of 1000 px (max_pixels)" in err
    assert "not used by this command" not in p.stderr
    cfg.write_text("images: {max_pixel: 1000}\n")
    p, _ = cli("replay", str(recs), "--images-root", str(tmp_path), "--json", "--config", str(cfg))
    assert p.returncode == 2 and "unknown setting(s) ['max_pixel']" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_eval_replay_records_with_a_deep_line_stop_with_an_error_naming_it(tmp_path):
    """``thyme eval --replay`` refuses a malformed records file before running (its documented
    contract); a deep line is one more malformed line, not a RecursionError."""
    rows = [
        {
            "question_id": "0",
            "image": "x.png",
            "question": "Left or right?",
            "options": "(A) left\n(B) right",
            "category": "relative_position",
            "answer": "A",
        }
    ]
    data = tmp_path / "vstar.jsonl"
    data.write_text(json.dumps(rows[0]) + "\n")
    recs = tmp_path / "recs.jsonl"
    recs.write_bytes(b'{"id": "a"}\n' + b"[" * DEEP + b"]" * DEEP + b"\n")
    p, _ = cli("eval", "--benchmark", "vstar", "--data", str(data), "--replay", str(recs), "--out", str(tmp_path / "o"))
    assert p.returncode == 2, p.stderr
    assert "line 2 is not valid JSON (nested" in p.stderr and "Traceback" not in p.stderr, p.stderr


# --------------------------------------------------------------------------- data annotate (issue 19)


def test_annotate_export_names_bombs_without_decoding_them(tmp_path, bombs, no_decode):
    from thyme.data.annotate import export_annotation

    folder = tmp_path / "photos"
    folder.mkdir()
    for b in bombs.values():
        _local(folder, b)
    _good(folder / "ok.png", size=(2100, 40))
    s = export_annotation(folder, tmp_path / "ls")
    skipped = {r["file"]: r for r in map(json.loads, (tmp_path / "ls" / "skipped.jsonl").read_text().splitlines())}
    assert s.tasks == 1
    assert {k: v["reason"] for k, v in skipped.items()} == {"huge.png": "over the image budget", "ratio.png": "over the image budget"}
    assert "30000x30000" in skipped["huge.png"]["detail"]
    assert (30000, 30000) not in no_decode and (12000, 12000) not in no_decode


def test_annotate_import_refuses_a_huge_or_deep_export_naming_it(tmp_path):
    from thyme.data.annotate import AnnotateConfig, import_annotations
    from thyme.errors import ThymeError

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ThymeError, match="deep.json") as e:
        import_annotations(deep, tmp_path / "rl.jsonl", images_root=tmp_path)
    assert "Traceback" not in str(e.value)
    huge = tmp_path / "huge.json"
    huge.write_text("[" + ",".join(["{}"] * 400000) + "]")  # 1.2 MB
    with pytest.raises(ThymeError, match="huge.json.*max-export-mb"):
        import_annotations(huge, tmp_path / "rl.jsonl", cfg=AnnotateConfig(max_export_mb=1), images_root=tmp_path)
