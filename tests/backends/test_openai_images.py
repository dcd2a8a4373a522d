"""The ``openai`` backend's image path and request bytes, as the serve fast path left them:
the pixels the model sees (resize to Qwen's grid, re-encoding), our ``smart_resize`` against
transformers', the request body's bytes, the encoded-image cache shared by threads, and the
agent's prefetch of input images (issue 20, benchmark)."""

from __future__ import annotations

import base64
import io
import json
import random
import threading
import time

import numpy as np
import pytest
from PIL import Image

import thyme.backends.openai as oa
from thyme.agent import Agent, AgentConfig
from thyme.backends.base import Generation, GenerationRequest
from thyme.backends.openai import OpenAIBackend, encode_image, smart_resize
from thyme.errors import ImageError

BUDGETS = [
    (3136, 12845056),  # Qwen2.5-VL's released processor
    (3136, 1003520),  # the paper's evaluation budget
    (56 * 56, 14 * 14 * 4 * 1280),  # transformers' defaults
    (256 * 28 * 28, 1280 * 28 * 28),
    (784, 50_000),
    (1, 10**9),
]


def _decode(url: str) -> Image.Image:
    head, b64 = url.split(",", 1)
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def _pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def test_our_smart_resize_is_transformers_over_many_sizes_factors_and_budgets():
    mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    rng = random.Random(0)
    sizes = [(h, w) for h in range(1, 60) for w in range(1, 60)]
    sizes += [(rng.randint(1, 12000), rng.randint(1, 12000)) for _ in range(3000)]
    sizes += [(480, 640), (476, 644), (5241, 8064), (1, 200), (1, 201), (200, 1), (28, 5600), (28, 5601), (3, 599), (3, 601)]
    checked = refused = 0
    for factor in (14, 28, 32):
        for lo, hi in BUDGETS:
            for h, w in sizes:
                try:
                    want = tuple(mod.smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi))
                except ValueError as e:
                    with pytest.raises(ValueError, match="aspect ratio"):
                        smart_resize(h, w, factor, lo, hi)
                    assert "aspect ratio" in str(e)
                    refused += 1
                    continue
                assert smart_resize(h, w, factor, lo, hi) == want, (h, w, factor, lo, hi)
                checked += 1
    assert checked > 50_000 and refused > 100


def _reference(src, fmt: str, tw: int, th: int) -> np.ndarray:
    """What the model must see: PIL's bicubic resize to the grid (the Qwen processor's filter),
    then, for a JPEG source, JPEG quality 95 without chroma subsampling, decoded."""
    with Image.open(src) as im:
        rgb = im.convert("RGB")
    if rgb.size != (tw, th):
        rgb = rgb.resize((tw, th), Image.Resampling.BICUBIC)
    if fmt == "JPEG":
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=95, subsampling=0)
        return _pixels(Image.open(io.BytesIO(buf.getvalue())))
    return _pixels(rgb)


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("PNG", "P")])
@pytest.mark.parametrize("size,max_pixels", [((640, 480), 12845056), ((37, 29), 12845056), ((1500, 1000), 400_000), ((644, 476), 12845056)])
def test_the_model_sees_the_same_pixels_as_before(tmp_path, fmt, mode, size, max_pixels):
    """Pixel for pixel, the uploaded image is the source resized to Qwen's grid with the
    bicubic filter (and re-encoded as JPEG q95 4:4:4 when the source is a JPEG, losslessly
    otherwise); a source already on the grid is sent as its own bytes."""
    rng = np.random.RandomState(sum(size) + len(mode))
    w, h = size
    arr = (rng.rand(h // 8 + 1, w // 8 + 1, 3) * 255).astype("uint8")
    im = Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR)  # smooth, photo-like
    im = im.convert(mode) if mode != "P" else im.quantize(64)
    src = tmp_path / f"in.{fmt.lower()}"
    im.save(src, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    enc = encode_image(src, max_pixels=max_pixels)
    th, tw = smart_resize(h, w, 28, 3136, max_pixels)
    assert enc.size == (tw, th) and enc.source_size == (w, h)
    got = _decode(enc.url)
    assert got.size == (tw, th)
    if not enc.reencoded:  # on the grid, a JPEG/PNG in RGB or L: its own bytes
        assert (tw, th) == (w, h) and mode in ("RGB", "L")
        assert base64.b64decode(enc.url.split(",", 1)[1]) == src.read_bytes()
        return
    assert enc.mime == ("image/jpeg" if fmt == "JPEG" else "image/png")
    np.testing.assert_array_equal(_pixels(got), _reference(src, fmt, tw, th))


def _request(path, crop=None, text="[code] What is written?"):
    msgs = [
        {"role": "system", "content": [{"type": "text", "text": "You are Thyme."}]},
        {"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": text}]},
    ]
    parts = []
    if crop is not None:
        parts = [
            {"type": "text", "text": '<code>print("é\\n")</code>\n<sandbox_output>'},
            {"type": "image", "image": str(crop)},
            {"type": "text", "text": "</sandbox_output>"},
        ]
    return GenerationRequest(messages=msgs, assistant_parts=parts, round=1 if parts else 0, max_new_tokens=100)


def _photo(path, size=(640, 480)):
    arr = (np.random.RandomState(3).rand(size[1] // 8, size[0] // 8, 3) * 255).astype("uint8")
    Image.fromarray(arr).resize(size, Image.Resampling.BILINEAR).save(path, quality=90)
    return path


def test_the_request_bytes_are_the_json_of_the_body(tmp_path):
    """The body sent is byte for byte ``json.dumps(build_body(...), ensure_ascii=False)``, with
    our data URLs put in whole, text with quotes, backslashes, non-ASCII and control characters,
    a caller's own data URL, and ``extra_body``."""
    src, crop = _photo(tmp_path / "in.jpg"), tmp_path / "crop.png"
    Image.new("RGB", (300, 200), "red").save(crop)
    weird = "data:image/png;base64," + base64.b64encode(b"x" * 5000).decode() + '"\\\u2028é'
    be = OpenAIBackend("http://127.0.0.1:9/v1", "m", extra_body={"chat_template_kwargs": {"x": 'é"\\'}})
    try:
        reqs = [_request(src), _request(src, crop, text='[code] "quoted" \\ é \u2028 \x01 thyme-image-')]
        own = _request(src)
        own.messages[1]["content"].insert(0, {"type": "image", "image": weird})
        reqs.append(own)
        for r in reqs:
            path, payload = be._payload(r)
            path2, body = be.build_body(r)
            assert path == path2 == "/chat/completions"
            assert payload == json.dumps(body, ensure_ascii=False).encode("utf-8")
            sent = json.loads(payload)
            urls = [
                p["image_url"]["url"]
                for m in sent["messages"]
                if isinstance(m["content"], list)
                for p in m["content"]
                if p["type"] == "image_url"
            ]
            assert be.encode(src).url in urls and len(urls) == (1 if r is reqs[0] else 2)
        assert weird in json.loads(be._payload(own)[1])["messages"][1]["content"][0]["image_url"]["url"]
    finally:
        be.close()


def test_an_image_being_encoded_is_not_encoded_again_by_another_thread(tmp_path, monkeypatch):
    src = _photo(tmp_path / "in.jpg")
    calls, go = [], threading.Event()
    real = oa.encode_image

    def slow(*a, **kw):
        calls.append(1)
        go.wait(10)
        return real(*a, **kw)

    monkeypatch.setattr(oa, "encode_image", slow)
    be = OpenAIBackend("http://127.0.0.1:9/v1", "m")
    try:
        out = [None, None]
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, be.encode(src))) for i in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.2)  # the first is inside the encoder, the second waits for it
        go.set()
        for t in threads:
            t.join(10)
        assert len(calls) == 1 and be.stats["images"] == 1
        assert out[0] is out[1] and out[0].reencoded
    finally:
        be.close()


def test_a_failed_encode_fails_every_caller_with_its_own_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    be = OpenAIBackend("http://127.0.0.1:9/v1", "m")
    try:
        errors = []

        def go():
            try:
                be.encode(bad)
            except ImageError as e:
                errors.append(e)

        threads = [threading.Thread(target=go) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(errors) == 4 and all("bad.jpg" in str(e) for e in errors)
        assert not be._cache._pending  # nothing left in flight
    finally:
        be.close()


def test_prefetch_encodes_the_inputs_once_and_never_raises(tmp_path):
    src = _photo(tmp_path / "in.jpg")
    be = OpenAIBackend("http://127.0.0.1:9/v1", "m")
    try:
        be.prefetch_images([str(src), str(tmp_path / "missing.jpg"), "data:image/png;base64,AAAA", "https://example.com/x.png"])
        be._prefetcher.shutdown(wait=True)  # let it finish (test only)
        assert be.stats["images"] == 1  # the missing file failed quietly; URLs are not prefetched
        path, body = be.build_body(_request(src))
        assert be.stats["images"] == 1  # the request found it encoded
        assert body["messages"][1]["content"][0]["image_url"]["url"] == encode_image(src).url
        with pytest.raises(ImageError, match="missing.jpg"):
            be.build_body(_request(tmp_path / "missing.jpg"))  # its own request reports it
    finally:
        be.close()
    be.prefetch_images([str(src)])  # after close: nothing, no error
    assert be._prefetcher is None
    text_only = OpenAIBackend("http://127.0.0.1:9/v1", "m", continuation="completions", tokenizer="x")
    try:
        text_only.prefetch_images([str(src)])  # sends no images: nothing to prefetch
        assert text_only._prefetcher is None and text_only.stats["images"] == 0
    finally:
        text_only.close()


class _Session:
    def __init__(self, log):
        self.log = log

    def __enter__(self):
        self.log.append("session")
        return self

    def __exit__(self, *exc):
        return None


class _Sandbox:
    def __init__(self):
        self.log = []

    def session(self, images, shown_paths=None):
        return _Session(self.log)


def test_the_agent_prefetches_the_input_images_before_the_sandbox_session_starts(tmp_path):
    from thyme.backends.base import Backend, Capabilities

    src = _photo(tmp_path / "in.jpg")
    sandbox = _Sandbox()

    class Answering(Backend):
        name = "answering"
        capabilities = Capabilities(independent_requests=True)

        def prefetch_images(self, images):
            sandbox.log.append(("prefetch", list(images)))

        def generate(self, requests, stream=None):  # type: ignore[override]
            return [Generation("<answer>A</answer>", "stop", stop="</answer>") for _ in requests]

    agent = Agent(Answering(), sandbox, AgentConfig(), artifacts_dir=tmp_path / "art")
    traj = agent.run("What?", [str(src)])
    assert traj.answer == "A"
    assert sandbox.log == [("prefetch", [str(src)]), "session"]
