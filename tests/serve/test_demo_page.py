"""The web demo ``thyme serve`` serves at ``/`` (``thyme.serve.demo``), in a real browser: headless
Chromium (the Debian package) driven by Playwright against a real server on the scripted backend:
upload an image, ask, and the reasoning, the code's sandbox image, its crop region on the input
and the answer appear; hostile model text stays text. A screenshot is kept as a test artifact
(``$THYME_TEST_ARTIFACTS/demo.png``, else under the test's tmp_path; the path is printed).

Without Chromium or Playwright these tests skip, but FAIL under ``THYME_REQUIRE_CHROMIUM=1`` or
``CI=true`` (``.ci/run`` sets both), so a CI host without a browser cannot pass them as skipped.
The page's headers, its public files and the crop fields it reads are tested without a browser.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from ..conftest import CORPUS
from .conftest import QUESTION, running_server, user_message

_TRUE = ("1", "true", "yes")
#: a missing browser fails instead of skipping (CI)
REQUIRE_CHROMIUM = os.environ.get("THYME_REQUIRE_CHROMIUM", "").lower() in _TRUE or os.environ.get("CI", "").lower() in _TRUE
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
KEY = "k" * 24

BOX = (100, 40, 300, 160)  # in the 600x200 input image
HOSTILE = '<img src=x onerror="window.__pwned=1"><b>bold?</b>'
CROP_STEP = (
    f"<think>Zoom in on the sign. {HOSTILE}\n<code>\n```python\nfrom PIL import Image\nimg = Image.open(image_path)\n"
    f"img.crop({BOX}).save('/mnt/data/temp_processed_images/crop.png')\n```\n</code>"
)
PRINTED = "<img src=y onerror=window.__pwned=3>"  # printed by the code: sandbox output is hostile too
PRINT_STEP = f"<think>Look first.\n<code>\n```python\nprint({PRINTED!r})\n```\n</code>"
ANSWER_STEP = "<think>The sign reads <script>window.__pwned=2</script> STOP.</think>\n<answer>B</answer>"


def _input_image(tmp_path: Path) -> Path:
    """A real photo of the corpus (600x200) when present, else a generated image of the same size."""
    real = CORPUS / "thyme" / "images" / "case1-2.jpg"
    if real.is_file():
        with Image.open(real) as im:
            if im.size == (600, 200):
                return real
    path = tmp_path / "sign.png"
    im = Image.new("RGB", (600, 200), "white")
    ImageDraw.Draw(im).rectangle(BOX, fill="red")
    im.save(path)
    return path


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (the system's, never a downloaded one) under Playwright."""
    why = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "playwright is not installed (the dev extra: pip install -c constraints.txt -e '.[dev]')"
    if CHROMIUM is None:
        why = "headless Chromium is not installed (Debian: apt-get install chromium)"
    if why:
        if REQUIRE_CHROMIUM:
            pytest.fail(f"THYME_REQUIRE_CHROMIUM=1 / CI, but {why}")
        pytest.skip(why)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


def _open(browser, url: str):
    """A page on the demo; returns it and the list collecting its script errors and CSP refusals."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    assert page.goto(url + "/").status == 200
    return page, problems


def _ask(page, image: Path, key: str | None = None) -> None:
    page.set_input_files("#image", str(image))
    page.wait_for_selector("#input-figure:not([hidden])")
    page.fill("#question", QUESTION)
    if key is not None:
        page.fill("#api-key", key)
    page.click("#ask")


def _screenshot(page, tmp_path: Path, capsys) -> Path:
    folder = Path(os.environ["THYME_TEST_ARTIFACTS"]) if os.environ.get("THYME_TEST_ARTIFACTS") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "demo.png"
    page.screenshot(path=str(path), full_page=True)
    with capsys.disabled():
        print(f"\n[demo screenshot: {path}]")
    return path


def test_the_page_streams_the_reasoning_the_sandbox_image_its_crop_and_the_answer(browser, tokenizer, sandbox, tmp_path, capsys):
    from thyme.testing.scripted import ScriptedBackend

    image = _input_image(tmp_path)
    backend = ScriptedBackend(tokenizer, [PRINT_STEP, CROP_STEP, ANSWER_STEP])
    with running_server(backend, sandbox) as srv:
        page, problems = _open(browser, srv.url)
        _ask(page, image)
        page.wait_for_selector("#answer-box:not([hidden])", timeout=120_000)
        assert page.text_content("#answer") == "B"
        assert page.text_content("#status") == "Done."
        assert page.is_hidden("#error")
        # each code block with its printed output or its sandbox image
        steps = page.locator("#log .step")
        assert steps.count() == 2
        assert steps.nth(0).locator("pre.code").text_content() == f"print({PRINTED!r})"
        printed = steps.nth(0).locator("pre.output").text_content()
        assert printed.replace("\u200b", "") == PRINTED  # as the model saw it (its tags neutralised with a zero-width space)
        step = steps.nth(1)  # the crop itself, 200x120 pixels, from a data: URL
        assert f"img.crop({BOX})" in step.locator("pre.code").text_content()
        out = step.locator("img")
        assert out.count() == 1
        assert out.get_attribute("src").startswith("data:image/png;base64,")
        assert out.evaluate("i => [i.complete, i.naturalWidth, i.naturalHeight]") == [True, 200, 120]
        # the crop region drawn on the input image, in its pixels
        assert page.locator("#crops").get_attribute("viewBox") == "0 0 600 200"
        rect = page.locator("#crops rect.crop")
        assert rect.count() == 1
        assert [rect.get_attribute(a) for a in ("x", "y", "width", "height")] == ["100", "40", "200", "120"]
        assert page.text_content("#crops text") == "2"  # numbered by code block
        # hostile model text is shown as text, never run or parsed as markup
        reasoning = page.text_content("#log")
        assert HOSTILE in reasoning and "<script>window.__pwned=2</script>" in reasoning
        assert page.evaluate("window.__pwned") is None
        assert page.locator("#log img").count() == 1 and page.locator("#log b, #log script").count() == 0
        assert page.locator("script").count() == 1  # the page's own
        shot = _screenshot(page, tmp_path, capsys)
        assert shot.stat().st_size > 10_000
        assert not problems, problems


def test_with_an_api_key_the_page_loads_and_its_calls_need_the_key(browser, tokenizer, sandbox, tmp_path):
    from thyme.testing.scripted import ScriptedBackend

    image = _input_image(tmp_path)
    backend = ScriptedBackend(tokenizer, [CROP_STEP, ANSWER_STEP])
    with running_server(backend, sandbox, api_key=KEY) as srv:
        page, problems = _open(browser, srv.url)  # the static page needs no key
        _ask(page, image)  # no key typed: the API says 401, the page says so
        page.wait_for_selector("#error:not([hidden])", timeout=60_000)
        error = page.text_content("#error")
        assert "401" in error and "API key" in error
        assert page.is_hidden("#answer-box") and not backend.requests
        _ask(page, image, key="wrong-" + KEY)  # the click clears the last error before any request
        page.wait_for_selector("#error:not([hidden])", timeout=60_000)
        assert "401" in page.text_content("#error")
        assert not backend.requests
        _ask(page, image, key=KEY)
        page.wait_for_selector("#answer-box:not([hidden])", timeout=120_000)
        assert page.text_content("#answer") == "B" and page.is_hidden("#error")
        assert page.locator("#log .step img").count() == 1
    # the browser logs each refused request (401) as a console error; nothing else went wrong
    assert all("401" in p for p in problems), problems


# ----------------------------------------------------------------- without a browser


def test_the_page_s_files_are_public_static_and_served_with_a_strict_policy(scripted, sandbox):
    from thyme.serve.demo import CONTENT_SECURITY_POLICY

    with running_server(scripted, sandbox, api_key=KEY) as srv:
        for path, media in (("/", "text/html"), ("/static/demo.js", "text/javascript"), ("/static/demo.css", "text/css")):
            for method in ("GET", "HEAD"):
                r = httpx.request(method, srv.url + path, timeout=30)
                assert r.status_code == 200, (method, path)
                assert r.headers["content-type"].startswith(media)
                assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
                assert r.headers["x-content-type-options"] == "nosniff"
        html = httpx.get(srv.url + "/", timeout=30).text
        script = httpx.get(srv.url + "/static/demo.js", timeout=30).text
        # everything else still needs the key: the API, other methods on the page, other paths
        for method, path in (("POST", "/"), ("GET", "/static/other.js"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            r = httpx.request(method, srv.url + path, json={"messages": user_message()}, timeout=30)
            assert r.status_code == 401, (method, path)
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY and "script-src 'self';" in CONTENT_SECURITY_POLICY
    assert "img-src data:;" in CONTENT_SECURITY_POLICY and "connect-src 'self';" in CONTENT_SECURITY_POLICY
    # no inline script or handler in the page; the script never parses text as HTML
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/demo.js" defer>']
    assert not re.search(r"\son\w+\s*=", html)
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink


def test_crop_regions_are_in_the_trajectory_and_the_sandbox_events(tokenizer, sandbox):
    """Boxes in input-image pixels: the box really cropped and, when the sandbox repaired it, the one asked for."""
    import json

    from thyme.testing.scripted import ScriptedBackend

    outside = CROP_STEP.replace(str(BOX), "(40, 30, 100, 90)")  # past the 64x48 input: the sandbox clamps it
    backend = ScriptedBackend(tokenizer, [outside, ANSWER_STEP])
    with running_server(backend, sandbox) as srv:
        plain = httpx.post(srv.url + "/v1/chat/completions", json={"messages": user_message()}, timeout=120).json()
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json={"messages": user_message(), "stream": True}, timeout=120) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    field = plain["thyme"]
    assert field["input_size"] == [64, 48]
    repairs = field["rounds"][0]["repairs"]
    assert [f["name"] for f in repairs if f["name"].startswith("crop_")], repairs  # the sandbox repaired the box
    assert field["rounds"][0]["crops"] == [{"box": [0, 0, 64, 48], "requested": [40, 30, 100, 90]}]  # as really cropped
    assert field["rounds"][1]["crops"] == []
    events = [c["thyme"] for c in chunks if c.get("thyme")]
    (out,) = [e for e in events if e["event"] == "sandbox_output"]
    assert "img.crop((40, 30, 100, 90))" in out["code"] and out["input_size"] == [64, 48]
    assert out["crops"] == [{"box": [40, 30, 64, 48], "requested": None}]  # from the code alone: clipped to the image
    assert events[-1]["event"] == "done" and events[-1]["rounds"][0]["crops"] == field["rounds"][0]["crops"]


@pytest.fixture(scope="module")
def tiny_serve(tiny_checkpoint, tmp_path_factory):
    """``thyme serve --model TINY`` (the hf backend, a tiny random checkpoint) in its own process; yields its URL."""
    from thyme.testing.serve_load import ServeProcess

    args = ["--model", str(tiny_checkpoint), "--served-model-name", "tiny", "--max-new-tokens", "12", "--max-rounds", "2"]
    with ServeProcess([*args, "--max-pixels", "12544"]) as sp:
        yield sp.url


@pytest.mark.slow
def test_the_page_runs_a_tiny_checkpoint_through_the_serve_command(browser, tiny_serve, tmp_path):
    page, problems = _open(browser, tiny_serve)
    _ask(page, _input_image(tmp_path))
    page.wait_for_selector("#answer-box:not([hidden])", timeout=180_000)
    assert page.is_hidden("#error") and page.text_content("#status") == "Done."
    reason = page.text_content("#stop-reason")
    assert reason.startswith("stop reason: ") and reason != "stop reason: error"
    assert page.text_content("#log").strip()  # the model's (random) text streamed in
    assert not problems, problems
