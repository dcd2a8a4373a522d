"""The review round trip against a real Label Studio (issue 16, "Manual review with Label Studio").

Needs a running server: ``THYME_LABEL_STUDIO_URL``, ``THYME_LABEL_STUDIO_TOKEN`` (first annotator)
and ``THYME_LABEL_STUDIO_TOKEN_2`` (second annotator). ``make test-labelstudio`` starts a throw-away
server with both (``.ci/labelstudio.py``) and sets ``THYME_REQUIRE_LABEL_STUDIO=1``, which turns
the skip into a failure. No part of Label Studio is mocked: the project, tasks, annotations and
export are the server's own; thyme only talks to it over HTTP.

Annotations (two annotators, records from the corpus):
- record 1: both accept                        -> accepted
- record 2: both reject, "wrong answer"        -> rejected, reason "wrong answer", notes kept
- record 3: one accepts, one rejects           -> rejected, "disagreement", listed in the summary
- record 4: annotator 1 rejects, then accepts  -> accepted (their latest annotation counts)
- record 5: annotator 2 skips (cancelled)      -> pending (no vote), written nowhere
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import CORPUS, HAVE_CORPUS
from .conftest import FILES_ROOT, STRICT, URL


def _records(tmp: Path) -> tuple[Path, Path]:
    """Five records in a temporary records file and the folder their images are relative to
    (the corpus's Thyme trajectories; without the corpus, records over a generated image)."""
    kept = tmp / "kept.jsonl"
    if HAVE_CORPUS:
        lines = [l for l in (CORPUS / "thyme" / "trajectories.jsonl").read_text(encoding="utf-8").splitlines() if l.strip()][:5]
        assert len(lines) == 5
        kept.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return kept, CORPUS / "thyme"
    if STRICT:
        print("corpus not found: the round trip runs on generated records", file=sys.stderr)
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp / "in.png")
    Image.new("RGB", (16, 16), (30, 30, 200)).save(tmp / "out.png")
    recs = [
        {
            "id": f"gen-{i}",
            "image": ["in.png", "out.png"],
            "question": f"<image>\nWhat colour is patch {i}?",
            "response": "<think>crop</think><code>\n```python\nprint(1)\n```\n</code>\n"
            f"<sandbox_output><image></sandbox_output><answer>red {i}</answer>",
        }
        for i in range(5)
    ]
    kept.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return kept, tmp


def _choice(name: str, value: str) -> dict:
    from thyme.data.labelstudio import choices_result

    return choices_result(name, "question", value)


def _note(text: str) -> dict:
    from thyme.data.labelstudio import text_result

    return text_result("note", "question", text)


def _thyme(*args: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "thyme.cli", "data", "review", *args, "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_review_round_trip_against_label_studio(server, tmp_path, request):
    from thyme.data.review import LABEL_CONFIG

    one, two = server
    assert two.uses_personal_token and not one.uses_personal_token  # both kinds of token are exercised
    kept, root = _records(tmp_path)
    ids = [json.loads(l)["id"] for l in kept.read_text(encoding="utf-8").splitlines()]

    # export, create the project with our config and import the tasks: `thyme data review export --push`
    exported = _thyme(
        "export",
        str(kept),
        "--out",
        str(tmp_path / "ls"),
        "--images-root",
        str(root),
        "--push",
        URL,
        "--token-env",
        "THYME_LABEL_STUDIO_TOKEN",
        "--project-title",
        "thyme review round trip",
    )
    assert exported["tasks"] == 5 and exported["failed"] == 0 and exported["pushed"] == 5
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text(encoding="utf-8"))
    assert (tmp_path / "ls" / "labeling_config.xml").read_text(encoding="utf-8") == LABEL_CONFIG
    pid = exported["project_id"]
    request.addfinalizer(lambda: one.delete_project(pid))
    listed = one.list_tasks(pid)
    by_rec = {t["data"]["thyme_id"]: t for t in listed}
    assert sorted(by_rec) == sorted(ids)
    # the images travelled intact (data URLs), every one of the record's
    for t in tasks:
        assert by_rec[t["data"]["thyme_id"]]["data"]["images"] == t["data"]["images"]

    t1, t2, t3, t4, t5 = (by_rec[i]["id"] for i in ids)
    one.create_annotation(t1, [_choice("decision", "accept")])
    two.create_annotation(t1, [_choice("decision", "accept"), _note("crop is right")])
    one.create_annotation(t2, [_choice("decision", "reject"), _choice("reason", "wrong answer"), _note("the plate reads otherwise")])
    two.create_annotation(t2, [_choice("decision", "reject"), _choice("reason", "wrong answer")])
    one.create_annotation(t3, [_choice("decision", "accept")])
    two.create_annotation(t3, [_choice("decision", "reject"), _choice("reason", "leaks given coordinates or angle")])
    one.create_annotation(t4, [_choice("decision", "reject"), _choice("reason", "other")])
    one.create_annotation(t4, [_choice("decision", "accept")])
    two.create_annotation(t5, [], was_cancelled=True)

    export = tmp_path / "export.json"
    export.write_bytes(one.export_project(pid))

    accepted, rejected = tmp_path / "accepted.jsonl", tmp_path / "rejected.jsonl"
    s = _thyme("import", str(export), "--records", str(kept), "--out", str(accepted), "--rejected", str(rejected))
    assert (s["tasks"], s["bad_tasks"], s["accepted"], s["rejected"], s["pending"]) == (5, 0, 2, 2, 1), s
    assert s["errors"] == []

    lines = kept.read_text(encoding="utf-8").splitlines()
    acc = accepted.read_text(encoding="utf-8").splitlines()
    assert [json.loads(l)["id"] for l in acc] == [ids[0], ids[3]]
    assert [json.loads(l) for l in acc] == [json.loads(lines[0]), json.loads(lines[3])]  # the records, unchanged
    # `thyme data verify` keeps the accepted records as they are (the released format)
    v = subprocess.run(
        [sys.executable, "-m", "thyme.cli", "data", "verify", str(accepted), "--images-root", str(root), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert v.returncode == 0, v.stderr[-3000:]
    assert json.loads(v.stdout.strip().splitlines()[-1])["kept"] == 2
    rej = {r["id"]: r for r in map(json.loads, rejected.read_text(encoding="utf-8").splitlines())}
    assert sorted(rej) == sorted([ids[1], ids[2]])
    assert rej[ids[1]]["rejection"]["stage"] == "review"
    assert rej[ids[1]]["rejection"]["reason"] == "wrong answer"
    assert "the plate reads otherwise" in rej[ids[1]]["rejection"]["detail"]
    assert rej[ids[2]]["rejection"]["reason"] == "disagreement"
    assert [d["id"] for d in s["disagreements"]] == [ids[2]]
    assert sorted(v["decision"] for v in s["disagreements"][0]["votes"]) == ["accept", "reject"]
    assert len({v["annotator"] for v in rej[ids[1]]["review"]["votes"]}) == 2  # two distinct annotators

    # the same decisions fetched from the server (import --from-server): the same split
    s3 = _thyme(
        "import",
        "--records",
        str(kept),
        "--out",
        str(tmp_path / "a3.jsonl"),
        "--from-server",
        URL,
        "--project",
        str(pid),
        "--token-env",
        "THYME_LABEL_STUDIO_TOKEN_2",
    )
    assert (s3["accepted"], s3["rejected"], s3["pending"]) == (2, 2, 1), s3
    assert (tmp_path / "a3.jsonl").read_text(encoding="utf-8") == accepted.read_text(encoding="utf-8")

    # two annotators required: the single-annotator record 4 becomes pending
    s2 = _thyme("import", str(export), "--records", str(kept), "--out", str(tmp_path / "a2.jsonl"), "--min-annotators", "2")
    assert (s2["accepted"], s2["rejected"], s2["pending"]) == (1, 2, 2), s2


def test_local_files_images_are_served_by_label_studio(server, tmp_path, request):
    """``--image-mode local-files``: the task URLs point into the server's local-files root and the
    server hands back the very bytes of every image (the harness starts it with local-file serving)."""
    one, _ = server
    if not FILES_ROOT:
        if STRICT:
            pytest.fail("THYME_LABEL_STUDIO_FILES_ROOT is not set (make test-labelstudio sets it)")
        pytest.skip("no local-files root of the server")
    from PIL import Image

    folder = Path(FILES_ROOT) / "review test"  # a space: the URL must quote it
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / "in.png")
    Image.new("RGB", (16, 16), (30, 30, 200)).save(folder / "out 1.jpg")
    rec = {
        "id": "local-1",
        "image": ["in.png", "out 1.jpg"],
        "question": "<image>\nWhat colour?",
        "response": "<think>zoom</think><code>\n```python\nprint(1)\n```\n</code>\n"
        "<sandbox_output><image></sandbox_output><answer>red</answer>",
    }
    kept = folder / "kept.jsonl"
    kept.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    out = _thyme(
        "export",
        str(kept),
        "--out",
        str(tmp_path / "ls"),
        "--image-mode",
        "local-files",
        "--local-files-root",
        FILES_ROOT,
        "--push",
        URL,
        "--token-env",
        "THYME_LABEL_STUDIO_TOKEN",
    )
    assert out["tasks"] == 1 and out["pushed"] == 1 and isinstance(out["storage_id"], int)
    request.addfinalizer(lambda: one.delete_project(out["project_id"]))
    (task,) = one.list_tasks(out["project_id"])
    urls = task["data"]["images"]
    assert [u.split("?d=")[0] for u in urls] == ["/data/local-files/", "/data/local-files/"]
    assert [one.download(u) for u in urls] == [(folder / "in.png").read_bytes(), (folder / "out 1.jpg").read_bytes()]
