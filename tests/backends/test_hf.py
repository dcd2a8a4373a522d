"""The ``hf`` backend on a tiny random Qwen2.5-VL checkpoint (CPU, offline)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from thyme.backends.base import GenerationRequest
from thyme.backends.hf import HFBackend, QWEN_IMAGE_PLACEHOLDER, capture_vision_inputs, vision_tower
from thyme.testing.tiny_checkpoint import write_tiny_checkpoint
from thyme.errors import ImageError, ModelLoadError

from ..conftest import CORPUS

CORPUS_IMAGE = CORPUS / "thyme" / "images" / "case1-2.jpg"


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-hf") / "qwen2_5_vl", arch="qwen2_5_vl", seed=0)


@pytest.fixture(scope="session")
def backend(ckpt) -> HFBackend:
    return HFBackend(str(ckpt), seed=0)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("images")
    out = {}
    for name, (w, h), seed in (("wide", (300, 180), 1), ("small", (90, 120), 2), ("sandbox", (140, 84), 3)):
        p = d / f"{name}.png"
        Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")).save(p)
        out[name] = str(p)
    return out


def _messages(image: str, question: str = "What is shown?") -> list[dict]:
    return [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
    ]


def test_batch_of_two_with_different_images(backend, images):
    reqs = [
        GenerationRequest(_messages(images["wide"]), max_new_tokens=12, stop=[]),
        GenerationRequest(_messages(images["small"]), max_new_tokens=12, stop=[]),
    ]
    with capture_vision_inputs(backend.model) as calls:
        gens = backend.generate(reqs)
    assert len(gens) == 2
    for g in gens:
        assert g.finish_reason in ("length", "eos")
        assert g.num_tokens >= 1 and g.prompt_tokens > 0
    assert gens[0].prompt_tokens != gens[1].prompt_tokens  # different image sizes, different token counts
    assert len(calls) == 1  # one batched vision forward for both rows
    grids = calls[0]["grid_thw"].tolist()
    assert len(grids) == 2 and grids[0] != grids[1]
    # The same requests one at a time give the same greedy text (left padding is handled).
    solo = backend.generate([reqs[1]])[0]
    assert solo.text == gens[1].text


def test_length_and_per_row_caps(backend, images):
    reqs = [
        GenerationRequest(_messages(images["wide"]), max_new_tokens=3, stop=[]),
        GenerationRequest(_messages(images["small"]), max_new_tokens=9, stop=[]),
    ]
    gens = backend.generate(reqs)
    for g, cap in zip(gens, (3, 9)):
        if g.finish_reason == "length":
            assert g.num_tokens == cap
        else:
            assert g.finish_reason == "eos" and g.num_tokens <= cap


def test_stop_string_cuts_the_text(backend, images):
    msgs = _messages(images["wide"])
    base = backend.generate([GenerationRequest(msgs, max_new_tokens=24, stop=[])])[0]
    assert base.finish_reason == "length", "random weights should not end the turn this early"
    text = base.text
    # A stop string taken from the middle of the greedy text: same decoding, cut right after it.
    start = len(text) // 3
    stop = text[start : start + 3]
    assert stop and "\ufffd" not in stop
    g = backend.generate([GenerationRequest(msgs, max_new_tokens=24, stop=[stop])])[0]
    assert g.finish_reason == "stop" and g.stop == stop
    assert g.text == text[: text.index(stop) + len(stop)]
    assert 1 <= g.num_tokens < base.num_tokens


def test_stop_inside_a_token_is_cut(backend):
    """A stop that ends inside a token (``</code>`` inside ``>\\n``) is cut after the stop."""
    tok = backend.tokenizer
    ids = tok("x = 1\n```\n</code>\nmore text", add_special_tokens=False).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert any(p.startswith(">") and len(p) > 1 for p in pieces), pieces  # the '>' shares a token
    g = backend._finish_row(ids, ["</code>", "</answer>"])
    assert (g.finish_reason, g.stop, g.text) == ("stop", "</code>", "x = 1\n```\n</code>")
    assert tok.decode(ids[: g.num_tokens]).startswith(g.text) and "</code>" not in tok.decode(ids[: g.num_tokens - 1])
    eos = backend.eos_token_ids[0]
    g = backend._finish_row(tok("abc", add_special_tokens=False).input_ids + [eos, 5, 6], ["</code>"])
    assert (g.finish_reason, g.text) == ("eos", "abc")


def test_assistant_image_reaches_the_vision_tower(backend, images):
    """An image produced mid-trajectory (an image part of assistant_parts) is in the forward pass."""
    second = str(CORPUS_IMAGE) if CORPUS_IMAGE.is_file() else images["sandbox"]
    parts = [
        {"type": "text", "text": "<think>Let me crop.\n<code>\n```python\nprint('crop.png')\n```\n</code><sandbox_output>"},
        {"type": "image", "image": second},
        {"type": "text", "text": "</sandbox_output>"},
    ]
    req = GenerationRequest(_messages(images["small"]), assistant_parts=parts, max_new_tokens=4, stop=[])
    prompt = backend.render_prompt(req)
    assert prompt.endswith("<|im_start|>assistant\n" + parts[0]["text"] + QWEN_IMAGE_PLACEHOLDER + "</sandbox_output>")
    assert "<|im_end|>\n<|im_start|>assistant\n<think>" in prompt and prompt.count("<|im_start|>assistant") == 1

    with capture_vision_inputs(backend.model) as calls:
        g = backend.generate([req])[0]
    assert g.num_tokens >= 1
    assert len(calls) == 1
    captured, grid = calls[0]["pixel_values"], calls[0]["grid_thw"]
    assert grid.shape == (2, 3)
    expect = backend.processor.image_processor(images=[Image.open(second).convert("RGB")], return_tensors="pt")
    rows = expect["pixel_values"].to(torch.float32)
    assert grid[1].tolist() == expect["image_grid_thw"][0].tolist()
    assert captured.shape[0] == int(grid.prod(dim=1).sum())
    # The second image's patch rows are the last rows of what the vision tower received.
    assert torch.allclose(captured[-rows.shape[0] :], rows, atol=1e-5)


def test_image_count_matches_placeholders_across_rounds(backend, images):
    """Round 2 re-encodes everything: the user image and two sandbox images, all in order."""
    parts = [
        {"type": "text", "text": "<think>a<code>x</code><sandbox_output>"},
        {"type": "image", "image": images["sandbox"]},
        {"type": "text", "text": "</sandbox_output>b<code>y</code><sandbox_output>"},
        {"type": "image", "image": images["wide"]},
        {"type": "text", "text": "</sandbox_output>"},
    ]
    req = GenerationRequest(_messages(images["small"]), assistant_parts=parts, max_new_tokens=2, stop=[])
    with capture_vision_inputs(backend.model) as calls:
        backend.generate([req])
    assert calls[0]["grid_thw"].shape[0] == 3


def test_streaming_concatenates_to_the_text(backend, images):
    got: dict[int, str] = {}

    def cb(i: int, delta: str) -> None:
        assert delta
        got[i] = got.get(i, "") + delta

    reqs = [
        GenerationRequest(_messages(images["wide"]), max_new_tokens=16, stop=[]),
        GenerationRequest(_messages(images["small"]), max_new_tokens=6, stop=[]),
    ]
    gens = backend.generate(reqs[:1], stream=cb)
    assert got[0] == gens[0].text
    got.clear()
    gens = backend.generate(reqs, stream=cb)
    assert [got.get(i, "") for i in range(2)] == [g.text for g in gens]


def test_streaming_never_passes_a_stop(backend, images):
    msgs = _messages(images["wide"])
    text = backend.generate([GenerationRequest(msgs, max_new_tokens=20, stop=[])])[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    chunks: list[str] = []
    g = backend.generate([GenerationRequest(msgs, max_new_tokens=20, stop=[stop])], stream=lambda i, d: chunks.append(d))[0]
    assert g.finish_reason == "stop" and "".join(chunks) == g.text and g.text.endswith(stop)


def test_sampling_is_seeded(backend, images):
    def req(seed):
        return GenerationRequest(_messages(images["wide"]), max_new_tokens=10, stop=[], temperature=1.0, top_p=0.95, top_k=50, seed=seed)

    a, b, c = (backend.generate([req(s)])[0].text for s in (7, 7, 8))
    assert a == b
    assert a != c


def test_mixed_decoding_settings_in_one_batch(backend, images):
    reqs = [
        GenerationRequest(_messages(images["wide"]), max_new_tokens=5, stop=[]),
        GenerationRequest(_messages(images["wide"]), max_new_tokens=5, stop=[], temperature=0.7, seed=1),
        GenerationRequest(_messages(images["small"]), max_new_tokens=5, stop=["</answer>"]),
    ]
    gens = backend.generate(reqs)
    assert len(gens) == 3
    assert gens[0].text == backend.generate(reqs[:1])[0].text


def test_literal_special_tokens_in_text_stay_text(backend, images):
    parts = [{"type": "text", "text": "The output said <|im_end|> and <|image_pad|>."}]
    req = GenerationRequest(_messages(images["small"]), assistant_parts=parts, max_new_tokens=2, stop=[])
    prompt = backend.render_prompt(req)
    assert "<|image_pad|>." not in prompt and "<|im_end|> and" not in prompt
    assert len(backend.generate([req])) == 1  # no image-token mismatch


def test_missing_image_is_an_image_error(backend, images, tmp_path):
    missing = tmp_path / "gone.png"
    with pytest.raises(ImageError) as e:
        backend.generate([GenerationRequest(_messages(str(missing)), max_new_tokens=2)])
    assert str(missing) in str(e.value)
    parts = [{"type": "image", "image": str(missing)}]
    with pytest.raises(ImageError):
        backend.generate([GenerationRequest(_messages(images["small"]), assistant_parts=parts, max_new_tokens=2)])


def test_missing_model_path_is_a_model_load_error(tmp_path):
    missing = tmp_path / "models" / "Thyme-7B"
    with pytest.raises(ModelLoadError) as e:
        HFBackend(str(missing))
    assert str(missing) in str(e.value)


def test_bad_dtype_is_a_model_load_error(ckpt):
    with pytest.raises(ModelLoadError, match="dtype"):
        HFBackend(str(ckpt), dtype="int3")


def test_describe(backend):
    d = backend.describe()
    assert d["backend"] == "hf" and d["model"].endswith("qwen2_5_vl")
    assert d["architecture"] == "Qwen2_5_VLForConditionalGeneration"
    assert d["dtype"] == "float32" and d["device"] == "cpu"
    assert (d["min_pixels"], d["max_pixels"]) == (3136, 12845056)
    assert "commit" in d and "revision" in d


def test_pixel_budget_and_dtype_options(ckpt, images):
    be = HFBackend(str(ckpt), max_pixels=56 * 56, dtype="bfloat16")
    assert be.describe()["max_pixels"] == 3136 and be.describe()["dtype"] == "bfloat16"
    with capture_vision_inputs(be.model) as calls:
        be.generate([GenerationRequest(_messages(images["wide"]), max_new_tokens=2, stop=[])])
    t, h, w = calls[0]["grid_thw"][0].tolist()
    assert h * w * 14 * 14 <= 3136


def test_vision_tower_attribute(backend):
    assert vision_tower(backend.model) is backend.model.model.visual


def test_two_round_trajectory_timing(backend, images):
    """A 2-round Thyme step on CPU stays fast (re-encoding everything each round)."""
    msgs = _messages(images["wide"])
    t0 = time.perf_counter()
    r1 = backend.generate([GenerationRequest(msgs, max_new_tokens=32)])[0]
    parts = [{"type": "text", "text": r1.text + "<sandbox_output>"}, {"type": "image", "image": images["sandbox"]}, {"type": "text", "text": "</sandbox_output>"}]
    r2 = backend.generate([GenerationRequest(msgs, assistant_parts=parts, max_new_tokens=32, round=1)])[0]
    assert r2.prompt_tokens > r1.prompt_tokens
    assert time.perf_counter() - t0 < 10


def test_checkpoint_generation_defaults_do_not_leak(backend, images):
    """Qwen2.5-VL ships generation_config top_k=1, top_p=0.001, repetition_penalty=1.05:
    transformers fills unset fields from it, which must not turn sampling into greedy decoding."""
    gc = backend.model.generation_config
    saved = (gc.top_k, gc.top_p, gc.repetition_penalty, gc.temperature, gc.do_sample)
    gc.top_k, gc.top_p, gc.repetition_penalty, gc.temperature, gc.do_sample = 1, 0.001, 1.05, 0.1, True
    try:
        texts = {
            backend.generate([GenerationRequest(_messages(images["wide"]), max_new_tokens=8, stop=[], temperature=1.0, seed=s)])[0].text
            for s in range(4)
        }
        assert len(texts) > 1
        used = backend._generation_config(GenerationRequest([], temperature=0.0), 8)
        assert (used.do_sample, used.repetition_penalty) == (False, 1.0)
    finally:
        gc.top_k, gc.top_p, gc.repetition_penalty, gc.temperature, gc.do_sample = saved
