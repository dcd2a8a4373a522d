"""`thyme data convert`: released Thyme datasets (written here in their schemas) to local JSONL + images."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from thyme import protocol
from thyme.data.convert import ConvertConfig, PathRewriter, convert, image_bytes
from thyme.errors import RecordError, ThymeError

from ..conftest import CORPUS, corpus_records, needs_corpus

AUTHORS = "/mllm_hdd/yfzhang/data"


def released_sft_rows() -> list[dict]:
    """Corpus trajectories in the released SFT schema: embedded images named by the authors'
    paths, the question holding the filled Thyme user prompt with the authors' path."""
    from thyme.imageio import image_size

    rows = []
    for r in corpus_records():
        if r["id"] not in ("thyme-case-1", "thyme-case-7"):
            continue
        imgs = [CORPUS / "thyme" / p for p in r["image"]]
        names = [f"{AUTHORS}/hr_bench_4k/179.jpg", f"{AUTHORS}/temp_processed_images/179_crop_318.jpg"][: len(imgs)]
        question = r["question"]
        if imgs:
            question = protocol.user_prompt_text(protocol.strip_question_placeholder(question), names[0], image_size(imgs[0]))
        if names:
            response = r["response"].replace("print(processed_path)", f"print(processed_path)\n# saved as {names[-1]} ; see /other/disk/unknown.png")
        else:
            response = r["response"].replace("print(y_val)", "print(y_val)  # /other/disk/unknown.png")
        rows.append({"image": [{"bytes": p.read_bytes(), "path": n} for p, n in zip(imgs, names)], "question": question, "response": response})
    return rows


def write_parquet(rows: list[dict], path: Path) -> Path:
    import datasets

    features = datasets.Features({"image": datasets.Sequence(datasets.Image()), "question": datasets.Value("string"), "response": datasets.Value("string")})
    datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("image", "question", "response")}, features=features).to_parquet(str(path))
    return path


@needs_corpus
def test_convert_released_sft_parquet_rewrites_paths_and_resumes(tmp_path):
    src = write_parquet(released_sft_rows(), tmp_path / "2round-00000.parquet")
    out = tmp_path / "out" / "sft.jsonl"
    s = convert(str(src), out, ConvertConfig(split="2round", workers=2, chunk_size=1))
    assert (s.written, s.failed, s.images) == (2, 0, 2)
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["2round-0", "2round-1"]
    r = recs[0]
    local_in, local_out = r["image"]
    assert Path(local_in).read_bytes() == (CORPUS / "thyme/images/case1-1.jpg").read_bytes()
    assert Path(local_out).read_bytes() == (CORPUS / "thyme/images/case1-2.jpg").read_bytes()
    assert Path(local_in).is_relative_to(tmp_path / "out" / "sft_images")
    # the question's User Image Path, the code's input path and the output path now name the local copies
    assert f'User Image Path:** "{local_in}"' in r["question"] and AUTHORS not in r["question"]
    assert f'image_path = "{local_in}"' in r["response"] and "hr_bench_4k/179.jpg" not in r["response"]
    assert f"saved as {local_out}" in r["response"]
    assert r["unresolved_paths"] == ["/other/disk/unknown.png"] and s.unresolved_paths == 2
    assert recs[1]["image"] == [] and "unknown.png" in recs[1]["unresolved_paths"][0]
    # the converted record is a valid SFT record for the masks / verify
    from thyme.data.records import parse_sft_record

    assert parse_sft_record(r, images_root=out.parent).outputs == [local_out]  # inside the records' folder

    # a rerun resumes: nothing converted twice
    s2 = convert(str(src), out, ConvertConfig(split="2round", workers=2))
    assert (s2.written, s2.resumed, s2.images) == (0, 2, 0)
    assert len(out.read_text().splitlines()) == 2


@needs_corpus
def test_interrupted_conversion_continues_where_it_stopped(tmp_path):
    src = write_parquet(released_sft_rows(), tmp_path / "data.parquet")
    out = tmp_path / "o.jsonl"
    s1 = convert(str(src), out, ConvertConfig(limit=1, chunk_size=1))
    assert s1.written == 1
    with out.open("a") as f:  # a line cut by a crash
        f.write('{"id": "data-1", "image": [')
    s2 = convert(str(src), out, ConvertConfig(chunk_size=1))
    assert (s2.written, s2.resumed) == (1, 1)
    assert [json.loads(l)["id"] for l in out.read_text().splitlines()] == ["data-0", "data-1"]


@needs_corpus
def test_images_as_base64_bytes_or_paths_and_rl_rows(tmp_path):
    img = CORPUS / "thyme/images/case6-1.jpg"
    raw = img.read_bytes()
    b64 = base64.b64encode(raw).decode()
    rows = [
        {"id": "rl-a", "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": '<image>\nWhat? ### User Image Path:** "/mnt/x/150.jpg"'}],
         "images": ["data:image/jpeg;base64," + b64], "solution": "black", "question": "What?"},
        {"id": "rl-b", "messages": [{"role": "user", "content": "<image>\nQ"}], "images": [b64], "solution": "1", "question": "Q"},
        {"id": "rl-c", "messages": [{"role": "user", "content": "<image>\nQ"}], "images": ["imgs/p.jpg"], "solution": "2", "question": "Q"},
        {"id": "rl-d", "messages": [{"role": "user", "content": "<image>\nQ"}], "images": ["imgs/missing.jpg"], "solution": "3", "question": "Q"},
        {"id": "weird", "foo": 1},
    ]
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs/p.jpg").write_bytes(raw)
    src = tmp_path / "rl.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "conv" / "rl.jsonl"
    s = convert(str(src), out, ConvertConfig())
    assert (s.written, s.failed) == (3, 2)
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    for rid in ("rl-a", "rl-b", "rl-c"):
        assert Path(recs[rid]["images"][0]).read_bytes() == raw and recs[rid]["solution"]
    assert recs["rl-a"]["messages"][1]["content"].endswith(f'"{recs["rl-a"]["images"][0]}"')
    errors = {e["id"]: e["error"] for e in map(json.loads, (tmp_path / "conv/rl.errors.jsonl").read_text().splitlines())}
    assert "missing.jpg" in errors["rl-d"] and "unknown row schema" in errors["weird"]


def test_image_values_and_path_rewriting_units(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 80
    assert image_bytes({"bytes": png, "path": "/a/b/c.png"}) == (png, "c.png")
    assert image_bytes(bytearray(png)) == (png, None)
    assert image_bytes(base64.b64encode(png).decode())[0] == png
    with pytest.raises(RecordError, match="image not found"):
        image_bytes("nowhere/x.jpg", images_root=tmp_path)
    rw = PathRewriter({"in.jpg": "/L/in.jpg", "out_1.png": "/L/out_1.png"}, "/L/in.jpg")
    q = rw.question('<image>\nQ\n### User Image Path:** "/authors/disk/orig_name.jpg"')
    assert q.endswith('"/L/in.jpg"')
    text = rw.text('cv2.imread("/authors/disk/orig_name.jpg"); p = "/x/out_1.png"; o = "/mnt/data/temp_processed_images/z.png"; f"a_{s}.jpg"')
    assert '"/L/in.jpg"' in text and '"/L/out_1.png"' in text and "/mnt/data/temp_processed_images/z.png" in text
    assert rw.unresolved == []


def test_unreachable_hub_dataset_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets", raising=False)
    with pytest.raises(ThymeError, match="Kwai-Keye/Thyme-SFT"):
        convert("Kwai-Keye/Thyme-SFT", tmp_path / "o.jsonl", ConvertConfig(split="computation"))
    with pytest.raises(ThymeError, match="source not found"):
        convert(str(tmp_path / "nope.parquet"), tmp_path / "o.jsonl")
