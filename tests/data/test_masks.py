"""Loss masks from character spans: what a record trains on (``thyme data show-masks``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from thyme import protocol
from thyme.data.masks import IGNORE_INDEX, MaskConfig, encode_record, prepare_processor, render_record, show_masks
from thyme.data.records import parse_sft_record

from ..conftest import CORPUS, REPO, corpus_records, needs_corpus


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-m", "thyme.cli", "data", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    from thyme.backends.processors import load_processor

    return prepare_processor(load_processor(tiny_checkpoint), MaskConfig(max_pixels=200_704))


def corpus_record(rid: str):
    raw = next(r for r in corpus_records() if r["id"] == rid)
    return parse_sft_record(raw, images_root=CORPUS / "thyme")


@needs_corpus
def test_show_masks_on_two_round_record_trains_only_the_last_round(tiny_checkpoint, tmp_path):
    recs = corpus_records()
    index = [r["id"] for r in recs].index("thyme-case-7")
    p = run_cli("show-masks", str(CORPUS / "thyme/trajectories.jsonl"), "--model", str(tiny_checkpoint), "--index", str(index), "--json")
    assert p.returncode == 0, p.stderr
    spans = json.loads(p.stdout)
    resp = recs[index]["response"]
    first_end = resp.index(protocol.OUTPUT_END) + len(protocol.OUTPUT_END)
    second_start = resp.index("\n" + protocol.OUTPUT_START, first_end)
    second_end = resp.index(protocol.OUTPUT_END, second_start) + len(protocol.OUTPUT_END)
    # exactly: the second round's reasoning and code, then the closing reasoning, answer and end of turn
    assert spans == [resp[first_end:second_start], resp[second_end:] + "<|im_end|>"]
    assert spans[0].rstrip().endswith("</code>") and "x_val = 2.75 / (3.00**0.45)" in spans[0]
    assert spans[1].endswith("<answer>1.68, 0.45</answer><|im_end|>")
    joined = "".join(spans)
    assert "math.log2(15/11)" not in joined  # the first round's code
    assert "To find the constants" not in joined  # the first round's reasoning
    for tag in ("<sandbox_output>", "</sandbox_output>", "0.44745897697122117", "1.6773671336980667"):
        assert tag not in joined

    # text output names the spans too
    p = run_cli("show-masks", str(CORPUS / "thyme/trajectories.jsonl"), "--model", str(tiny_checkpoint), "--index", str(index))
    assert p.returncode == 0 and "trained span 2/2" in p.stdout and "0.44745897697122117" not in p.stdout


@needs_corpus
def test_one_round_record_trains_all_assistant_text_but_the_sandbox_output(processor):
    rec = corpus_record("thyme-case-1")
    s = encode_record(rec, processor)
    span = rec.spans[0]
    assert s.trained_texts() == [rec.response[: span.start], rec.response[span.end:] + "<|im_end|>"]
    # with all rounds trained, a two-round record trains its first round too, never an output
    s7 = encode_record(corpus_record("thyme-case-7"), processor, MaskConfig(last_round_only=False))
    assert len(s7.trained_texts()) == 3 and "math.log2(15/11)" in s7.trained_texts()[0]
    assert all("sandbox_output" not in t for t in s7.trained_texts())


@needs_corpus
def test_labels_follow_character_spans_and_image_tokens_are_never_trained(processor):
    rec = corpus_record("thyme-case-1")
    s = encode_record(rec, processor)
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    n_image_tokens = int(s.image_grid_thw.prod(-1).sum()) // 4
    assert sum(s.mm_token_type_ids) == n_image_tokens == sum(1 for t in s.input_ids if t == image_id)
    assert s.image_grid_thw.shape == (2, 3)  # the input and the sandbox output, in order
    for t, lab, (a, b), mm in zip(s.input_ids, s.labels, s.offsets, s.mm_token_type_ids):
        inside = any(x <= a and b <= y for x, y in s.spans)
        assert (lab == t) if inside else (lab == IGNORE_INDEX)
        if mm:
            assert lab == IGNORE_INDEX
    # the tokens spell the rendered text, offsets contiguous
    assert s.offsets[0][0] == 0 and s.offsets[-1][1] == len(s.text)
    assert s.labels[-1] == IGNORE_INDEX and s.text.endswith("<|im_end|>\n")  # the template's newline is not trained
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert s.labels[-2] == eos  # the closing end of turn is


@needs_corpus
def test_encoding_matches_the_processor_when_no_boundary_splits_a_token(processor):
    from thyme.imageio import open_image

    rec = corpus_record("thyme-case-8")  # no sandbox output
    pieces, images = render_record(rec, processor)
    s = encode_record(rec, processor)
    out = processor(text=["".join(p.text for p in pieces)], images=[open_image(p, mode="RGB") for p in images], return_tensors="pt")
    assert out["input_ids"][0].tolist() == s.input_ids
    assert out["mm_token_type_ids"][0].tolist() == s.mm_token_type_ids
    assert out["pixel_values"].shape == s.pixel_values.shape


@needs_corpus
def test_released_question_is_used_as_is_and_bare_question_is_wrapped(processor, tmp_path):
    raw = next(r for r in corpus_records() if r["id"] == "thyme-case-1")
    inp = str(CORPUS / "thyme" / raw["image"][0])
    bare = parse_sft_record(raw, images_root=CORPUS / "thyme")
    head = render_record(bare, processor)[0][0].text
    assert head.count("User Image Path") == 1 and f'"{inp}"' in head and protocol.SYSTEM_PROMPT in head

    filled = protocol.user_prompt_text(protocol.strip_question_placeholder(raw["question"]), "/local/copy.jpg", (10, 20))
    rel = dict(raw, question=filled, image=[inp, str(CORPUS / "thyme" / raw["image"][1])])
    head2 = render_record(parse_sft_record(rel, images_root=CORPUS / "thyme"), processor)[0][0].text
    assert head2.count("User Image Path") == 1 and '"/local/copy.jpg"' in head2 and '"10x20"' in head2
    # the question's <image> placeholder became the vision tokens, not text
    assert "<image>" not in head2 and head2.count("<|vision_start|>") == 1


@needs_corpus
def test_every_image_stays_under_the_pixel_budget(tiny_checkpoint):
    from thyme.backends.processors import load_processor

    budget = 50_176
    proc = prepare_processor(load_processor(tiny_checkpoint), MaskConfig(max_pixels=budget))
    s = encode_record(corpus_record("thyme-case-3"), proc, MaskConfig(max_pixels=budget))
    for t, h, w in s.image_grid_thw.tolist():
        assert h * w * 14 * 14 <= budget


def test_text_only_record_and_literal_special_tokens(processor):
    rec = parse_sft_record({"id": "t", "image": [], "question": "What is 2+2?", "response": "<think>say <|im_end|> here</think>\n<answer>4</answer>"})
    s = encode_record(rec, processor)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    trained = [t for t in s.labels if t != IGNORE_INDEX]
    assert trained.count(eos) == 1 and trained[-1] == eos  # the literal one stays text
    assert s.pixel_values is None and s.num_images == 0
    assert show_masks(s, as_json=True) == json.dumps([rec.response.replace("<|im_end|>", "<\u200b|im_end|>") + "<|im_end|>"], ensure_ascii=False)


def test_bad_records_are_clear_errors(tmp_path):
    from thyme.errors import RecordError

    with pytest.raises(RecordError, match="image"):
        parse_sft_record({"image": ["a.jpg"], "question": "<image>\nq", "response": "<sandbox_output><image></sandbox_output>"}, check_files=False)
    with pytest.raises(RecordError, match="never closed"):
        parse_sft_record({"image": [], "question": "q", "response": "<code>x</code><sandbox_output>1"})
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"image": [], "question": "q", "response": "a"}) + "\n")
    p = run_cli("show-masks", str(records), "--model", str(tmp_path / "nope"), "--index", "3")
    assert p.returncode == 2 and "no record 3" in p.stderr
