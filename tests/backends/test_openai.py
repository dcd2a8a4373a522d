"""The ``openai`` backend against real server processes on 127.0.0.1 (tiny checkpoint, CPU).

Two servers: our test server (``thyme.testing.openai_server serve``: vLLM's request fields over
the hf backend, with failure injection) and ``transformers serve`` (a third-party server that
answers single-turn chat requests with images and refuses the continuation fields).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from thyme import protocol
from thyme.agent import Agent, AgentConfig
from thyme.backends.base import GenerationRequest
from thyme.backends.hf import HFBackend
from thyme.backends.openai import (
    OpenAIBackend,
    OpenAIBatchError,
    OpenAIServerError,
    encode_image,
    normalise_base_url,
    smart_resize,
)
from thyme.testing.openai_server import start_server
from thyme.errors import ImageError, ThymeError

from ..conftest import CORPUS

pytestmark = pytest.mark.slow

SERVED = "tiny-thyme"
CROP = (
    "<think>Zoom into the top-left corner.\n<code>\n```python\n"
    "from PIL import Image\n"
    "img = Image.open(image_path)\n"
    "path = '/mnt/data/temp_processed_images/corner.png'\n"
    "img.crop((0, 0, 112, 112)).save(path)\n"
    "print(path)\n"
    "```\n</code>"
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("oai-images")
    out = {}
    for name, (w, h), seed in (("input", (224, 168), 1), ("other", (112, 84), 2)):
        p = d / f"{name}.png"
        Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")).save(p)
        out[name] = str(p)
    return out


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    with start_server(tiny_checkpoint, served_model_name=SERVED, log_dir=tmp_path_factory.mktemp("srv"), startup_timeout_s=120, extra_args=["--threads", "1"]) as s:
        yield s


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    return HFBackend(str(tiny_checkpoint), dtype="float32")


@pytest.fixture()
def control(server):
    """POST/GET helpers for the test server's /debug endpoints (state reset per test)."""
    root = server.base_url[: -len("/v1")]

    class Control:
        def fail(self, *plan):
            httpx.post(root + "/debug/fail", json=list(plan), timeout=10).raise_for_status()

        def requests(self):
            return httpx.get(root + "/debug/requests", timeout=10).json()

        def stats(self):
            return httpx.get(root + "/debug/stats", timeout=10).json()

    ctl = Control()
    for _ in range(40):  # a request an earlier test gave up on (timeout) may still be running
        if ctl.stats()["in_flight"] == 0:
            break
        time.sleep(0.25)
    httpx.post(root + "/debug/reset", timeout=10).raise_for_status()
    return ctl


def _messages(image: str | None, question: str = "What is shown?") -> list[dict]:
    user = ([{"type": "image", "image": image}] if image else []) + [{"type": "text", "text": question}]
    return [{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]}, {"role": "user", "content": user}]


def _backend(server, **kw) -> OpenAIBackend:
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 60)
    return OpenAIBackend(server.base_url, kw.pop("model", SERVED), **kw)


def _decode(url: str) -> Image.Image:
    head, _, b64 = url.partition(",")
    return Image.open(io.BytesIO(base64.b64decode(b64)))


# --------------------------------------------------------------------------- the request (no server)


def test_request_body_is_the_documented_vllm_request(images):
    b = OpenAIBackend("http://127.0.0.1:9/v1", "served", extra_body={"chat_template_kwargs": {"x": 1}})
    parts = [
        {"type": "text", "text": "<think>a</code>\n<sandbox_output>"},
        {"type": "image", "image": images["other"]},
        {"type": "text", "text": "</sandbox_output>"},
    ]
    req = GenerationRequest(_messages(images["input"]), parts, max_new_tokens=77, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.05, seed=3, round=2)
    path, body = b.build_body(req)
    assert path == "/chat/completions"
    assert list(body) == [
        "model", "messages", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "n", "stream",
        "include_stop_str_in_output", "continue_final_message", "add_generation_prompt", "chat_template_kwargs",
    ]
    assert (body["model"], body["max_tokens"], body["temperature"], body["top_p"], body["top_k"]) == ("served", 77, 0.7, 0.9, 50)
    assert (body["repetition_penalty"], body["seed"], body["stop"], body["n"], body["stream"]) == (1.05, 5, ["</code>", "</answer>"], 1, False)
    assert body["include_stop_str_in_output"] is True and body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["chat_template_kwargs"] == {"x": 1}
    sys_msg, user, asst = body["messages"]
    assert sys_msg == {"role": "system", "content": "You are a helpful assistant."}
    assert [p["type"] for p in user["content"]] == ["image_url", "text"]
    assert user["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert asst["role"] == "assistant"
    assert [p.get("text") for p in asst["content"]] == ["<think>a</code>\n<sandbox_output>", None, "</sandbox_output>"]
    assert _decode(asst["content"][1]["image_url"]["url"]).size == (112, 84)
    json.dumps(body)  # serialisable as is

    # greedy single turn: no sampling fields, no continuation fields, but the repetition
    # penalty explicitly (servers would take the checkpoint's 1.05 otherwise)
    _, single = b.build_body(GenerationRequest(_messages(images["input"]), max_new_tokens=5))
    assert set(single) == {"model", "messages", "max_tokens", "temperature", "repetition_penalty", "stop", "n", "stream", "include_stop_str_in_output", "chat_template_kwargs"}
    assert (single["temperature"], single["repetition_penalty"]) == (0.0, 1.0)
    _, sampled = b.build_body(GenerationRequest(_messages(images["input"]), temperature=1.0))
    assert (sampled["top_p"], sampled["top_k"]) == (1.0, -1)
    # a generic server gets only OpenAI fields at neutral settings
    plain = OpenAIBackend("http://127.0.0.1:9/v1", "served", continuation="none", send_stop=False)
    _, body = plain.build_body(GenerationRequest(_messages(images["input"]), temperature=1.0))
    assert set(body) == {"model", "messages", "max_tokens", "temperature", "top_p", "n", "stream"}

    # SGLang's spelling
    sg = OpenAIBackend("http://127.0.0.1:9/v1", "served", continuation="sglang")
    _, body = sg.build_body(req)
    assert body["no_stop_trim"] is True and body["continue_final_message"] is True
    assert "add_generation_prompt" not in body and "include_stop_str_in_output" not in body

    # a server without continuation refuses multi-round requests before sending anything
    with pytest.raises(ThymeError, match="continuation"):
        OpenAIBackend("http://127.0.0.1:9/v1", "served", continuation="none").build_body(req)
    # the raw-completions fallback carries no images
    with pytest.raises(ThymeError, match="cannot send images"):
        OpenAIBackend("http://127.0.0.1:9/v1", "served", continuation="completions").build_body(req)
    # a continued message must end with text (chat templates cut after the last text part)
    with pytest.raises(ThymeError, match="ends with an image"):
        b.build_body(GenerationRequest(_messages(images["input"]), parts[:2]))


def test_bad_settings_are_named():
    with pytest.raises(ThymeError, match="base-url"):
        OpenAIBackend("localhost:8000", "m")
    with pytest.raises(ThymeError, match="continuation"):
        OpenAIBackend("http://h/v1", "m", continuation="tgi")
    with pytest.raises(ThymeError, match="min_pixels"):
        OpenAIBackend("http://h/v1", "m", min_pixels=10_000, max_pixels=5_000)
    with pytest.raises(ThymeError, match="unknown setting"):
        OpenAIBackend("http://h/v1", "m", max_pixel=5)
    assert normalise_base_url("http://h:8000") == "http://h:8000/v1"
    assert normalise_base_url("http://h:8000/v1/chat/completions/") == "http://h:8000/v1"


def test_8k_images_are_resized_to_the_pixel_budget_before_upload(tmp_path):
    src = CORPUS / "benchmarks/images"
    big = next(iter(sorted(src.glob("*.jp*g"), key=lambda p: -p.stat().st_size)), None) if src.is_dir() else None
    if big is None or Image.open(big).size[0] < 7000:
        big = tmp_path / "8k.jpg"
        small = (np.random.RandomState(0).rand(52, 81, 3) * 255).astype("uint8")
        Image.fromarray(small).resize((8064, 5241), Image.Resampling.BILINEAR).save(big, quality=90)
    w, h = Image.open(big).size
    assert w * h > 40_000_000
    for budget in (12845056, 1003520):
        enc = encode_image(big, max_pixels=budget)
        th, tw = smart_resize(h, w, 28, 3136, budget)
        assert enc.size == (tw, th) and tw % 28 == 0 and th % 28 == 0 and tw * th <= budget
        assert enc.mime == "image/jpeg" and enc.reencoded  # a JPEG source stays JPEG
        assert _decode(enc.url).size == (tw, th)
        assert len(enc.url) < 12_000_000  # the request stays a few MB, not the 8K original
    # a PNG that needs resizing stays lossless
    png = tmp_path / "wide.png"
    Image.fromarray((np.random.RandomState(1).rand(300, 450, 3) * 255).astype("uint8")).save(png)
    enc = encode_image(png, max_pixels=50_000)
    assert enc.mime == "image/png" and enc.size[0] * enc.size[1] <= 50_000
    # an image already within the budget at a multiple of 28 is sent as its own bytes
    same = tmp_path / "ok.jpg"
    Image.new("RGB", (280, 196), (9, 99, 199)).save(same, quality=80)
    enc = encode_image(same)
    assert not enc.reencoded and base64.b64decode(enc.url.partition(",")[2]) == same.read_bytes()
    with pytest.raises(ImageError, match="not found"):
        encode_image(tmp_path / "missing.png")


def test_finish_reasons_and_stop_strings_whatever_the_server_did():
    b = OpenAIBackend("http://127.0.0.1:9/v1", "m")
    req = GenerationRequest([], stop=["</code>", "</answer>"])

    def gen(text, finish, **extra):
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, **extra}
        return b.parse_response({"choices": [choice], "usage": {"completion_tokens": 7, "prompt_tokens": 11}}, req)

    g = gen("<code>x</code>", "stop", stop_reason="</code>")  # vLLM with include_stop_str_in_output
    assert (g.text, g.finish_reason, g.stop, g.num_tokens, g.prompt_tokens) == ("<code>x</code>", "stop", "</code>", 7, 11)
    g = gen("<code>x", "stop", stop_reason="</code>")  # vLLM default: stop string stripped
    assert (g.text, g.stop) == ("<code>x</code>", "</code>")
    g = gen("<answer>B", "stop", matched_stop="</answer>")  # SGLang without no_stop_trim
    assert (g.text, g.stop) == ("<answer>B</answer>", "</answer>")
    g = gen("<think>y<code>x", "stop")  # plain OpenAI server: the open tag tells
    assert (g.text, g.finish_reason) == ("<think>y<code>x</code>", "stop")
    g = gen("<think>y</think><answer>A</answer> and on", "length")  # no server-side stop: cut here
    assert (g.text, g.finish_reason, g.stop) == ("<think>y</think><answer>A</answer>", "stop", "</answer>")
    g = gen("<think>done", "stop", stop_reason=None)  # end-of-turn token
    assert (g.text, g.finish_reason) == ("<think>done", "eos")
    g = gen("<think>cut", "length")
    assert g.finish_reason == "length"
    with pytest.raises(OpenAIServerError, match="abort"):
        gen("", "abort")


# --------------------------------------------------------------------------- our test server


def test_single_turn_with_an_image_matches_the_hf_backend(server, hf, control, images):
    req = GenerationRequest(_messages(images["input"]), max_new_tokens=16)
    with _backend(server) as b:
        (g,) = b.generate([req])
        assert b.describe()["server_model"]["id"] == SERVED
    (ref,) = hf.generate([req])
    assert (g.text, g.finish_reason, g.num_tokens, g.prompt_tokens) == (ref.text, ref.finish_reason, ref.num_tokens, ref.prompt_tokens)
    (log,) = control.requests()
    body = log["body"]
    assert body["include_stop_str_in_output"] is True and "continue_final_message" not in body
    assert body["messages"][1]["content"][0]["image"]["size"] == [224, 168]
    assert log["prompt"] == hf.render_prompt(req)


def test_agent_loop_continues_the_message_with_the_sandbox_image(server, hf, control, images, tmp_path):
    from thyme.sandbox import Sandbox

    cfg = AgentConfig(prefill=CROP, max_new_tokens=12, max_rounds=2)
    with Sandbox() as sandbox:
        with _backend(server) as b, Agent(b, sandbox, cfg, artifacts_dir=tmp_path / "oai") as agent:
            traj = agent.run("What is in the corner?", [images["input"]])
        with Agent(hf, sandbox, cfg, artifacts_dir=tmp_path / "hf") as agent:
            ref = agent.run("What is in the corner?", [images["input"]])
    assert traj.stop_reason != "error", traj.error
    assert ref.stop_reason != "error", ref.error
    assert len(traj.turns) >= 2  # the forced code segment, then at least one generated round
    forced = traj.turns[0]
    assert forced.execution["ok"] and len(forced.execution["images"]) == 1, forced.execution
    first = control.requests()[0]
    assert first["status"] == 200
    body = first["body"]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    asst = body["messages"][-1]
    assert asst["role"] == "assistant"
    assert [p["type"] for p in asst["content"]] == ["text", "image_url", "text"]
    assert asst["content"][0]["text"] == CROP + "\n<sandbox_output>"
    assert asst["content"][1]["image"]["size"] == [112, 112]  # the sandbox's crop reached the server
    assert asst["content"][2]["text"] == "</sandbox_output>"
    # vLLM-style rendering continues the same assistant message: no end of turn, no new header
    assert first["prompt"].endswith("</sandbox_output>") and first["prompt"].count("<|im_start|>assistant") == 1
    assert first["prompt"].count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    # and the model continued exactly as the in-process hf backend does
    assert [t.text for t in traj.turns] == [t.text for t in ref.turns]
    assert traj.response_text() == ref.response_text()


def test_stop_strings_end_the_text_and_are_kept(server, hf, images, control):
    probe = GenerationRequest(_messages(images["input"]), max_new_tokens=16)
    (ref,) = hf.generate([probe])
    stop = ref.text[4:9]
    assert stop and ref.text.find(stop) == 4
    req = GenerationRequest(_messages(images["input"]), max_new_tokens=16, stop=[stop])
    with _backend(server) as b:
        (g,) = b.generate([req])
    assert (g.text, g.finish_reason, g.stop) == (ref.text[:9], "stop", stop)
    # a text-only request through the raw-completions fallback: the server strips the stop
    # string (no include_stop_str_in_output there) and reports it; the backend puts it back
    text_req = GenerationRequest(_messages(None, "Say something."), max_new_tokens=16)
    (tref,) = hf.generate([text_req])
    tstop = tref.text[3:7]
    assert tstop and tref.text.find(tstop) == 3
    with _backend(server, continuation="completions", tokenizer=str(hf.model_id)) as b:
        (g,) = b.generate([GenerationRequest(_messages(None, "Say something."), max_new_tokens=16, stop=[tstop])])
    assert (g.text, g.stop) == (tref.text[:7], tstop)
    log = control.requests()[-1]
    assert log["endpoint"] == "completions" and log["body"]["prompt"] == hf.render_prompt(text_req)


def test_retries_on_429_and_503_then_success(server, control, images):
    control.fail({"status": 429, "retry_after": 0}, {"status": 503})
    with _backend(server, max_retries=3) as b:
        (g,) = b.generate([GenerationRequest(_messages(images["input"]), max_new_tokens=4)])
        assert b.stats["retries"] == 2 and b.stats["requests"] == 3 and b.stats["failed"] == 0
    assert g.num_tokens > 0
    assert [r["status"] for r in control.requests()] == [429, 503, 200]


def test_a_400_is_a_clear_error_and_is_not_retried(server, control, images):
    control.fail({"status": 400, "body": {"error": {"message": "prompt too long for this test", "code": 400}}})
    with _backend(server, max_retries=3) as b:
        with pytest.raises(OpenAIServerError) as ei:
            b.generate([GenerationRequest(_messages(images["input"]), max_new_tokens=4)])
    e = ei.value
    assert e.status == 400 and e.attempts == 1 and not e.retryable
    assert server.base_url in str(e) and "HTTP 400" in str(e) and "prompt too long for this test" in str(e)
    assert len(control.requests()) == 1


def test_retries_run_out_with_a_clear_error(server, control, images):
    control.fail({"status": 503}, {"status": 503}, {"status": 503})
    with _backend(server, max_retries=2) as b:
        with pytest.raises(OpenAIServerError, match="HTTP 503.*gave up after 3 attempts"):
            b.generate([GenerationRequest(_messages(images["input"]), max_new_tokens=4)])
    assert [r["status"] for r in control.requests()] == [503, 503, 503]


def test_a_timeout_is_retried(server, control, images):
    control.fail({"delay_s": 2.5})
    with _backend(server, timeout_s=0.8, max_retries=2) as b:
        (g,) = b.generate([GenerationRequest(_messages(images["input"]), max_new_tokens=4)])
        assert b.stats["retries"] >= 1
    assert g.num_tokens > 0


def test_concurrency_limit_and_one_bad_request_does_not_sink_the_batch(server, control, images, tmp_path):
    control.fail(*[{"delay_s": 0.4}] * 6)
    reqs = [GenerationRequest(_messages(images["input"], f"Question {i}?"), max_new_tokens=3) for i in range(6)]
    with _backend(server, concurrency=2) as b:
        gens = b.generate(reqs)
    assert len(gens) == 6 and all(g.num_tokens > 0 for g in gens)
    assert control.stats()["max_in_flight"] == 2

    bad = GenerationRequest(_messages(str(tmp_path / "missing.png")), max_new_tokens=3)
    with _backend(server) as b:
        with pytest.raises(OpenAIBatchError) as ei:
            b.generate([reqs[0], bad, reqs[1]])
    err = ei.value
    assert isinstance(err.errors[1], ImageError) and err.errors[0] is None and err.errors[2] is None
    assert err.generations[0].num_tokens > 0 and err.generations[2].num_tokens > 0 and err.generations[1] is None


def test_agenerate_inside_an_event_loop(server, images):
    reqs = [GenerationRequest(_messages(images["input"]), max_new_tokens=5), GenerationRequest(_messages(images["other"]), max_new_tokens=5)]
    with _backend(server) as b:
        seen = []
        out = asyncio.run(b.agenerate(reqs, stream=lambda i, t: seen.append(i)))
        again = b.generate(reqs)
    assert [g.text for g in out] == [g.text for g in again] and sorted(seen) == [0, 1]


def test_wrong_model_name_and_unreachable_server(server):
    with _backend(server, model="no-such-model") as b:
        with pytest.raises(OpenAIServerError) as ei:
            b.generate([GenerationRequest(_messages(None), max_new_tokens=2)])
    assert ei.value.status == 404 and SERVED in ei.value.hint
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with OpenAIBackend(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, backoff_s=0.01, timeout_s=5) as b:
        with pytest.raises(OpenAIServerError, match="cannot reach .*gave up after 2 attempts") as ei:
            b.generate([GenerationRequest(_messages(None), max_new_tokens=2)])
    assert ei.value.retryable and ei.value.status is None


# --------------------------------------------------------------------------- transformers serve


@pytest.fixture(scope="module")
def transformers_server(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("fastapi", reason="transformers serve needs transformers[serving] (fastapi, uvicorn)")
    pytest.importorskip("uvicorn", reason="transformers serve needs transformers[serving] (fastapi, uvicorn)")
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with start_server(tiny_checkpoint, kind="transformers", log_dir=tmp_path_factory.mktemp("tsrv"), env=env, startup_timeout_s=120) as s:
        yield s


def test_transformers_serve_single_turn_with_an_image(transformers_server, hf, images):
    model = str(transformers_server.model)
    req = GenerationRequest(_messages(images["input"]), max_new_tokens=16)
    # transformers serve 5.23 rejects vLLM's extra fields and fails on `stop` with a VLM
    # processor: plain chat completions, stop strings applied client-side
    with OpenAIBackend(transformers_server.base_url, model, continuation="none", send_stop=False, backoff_s=0.01) as b:
        (g,) = b.generate([req])
        (ref,) = hf.generate([req])
        assert (g.text, g.prompt_tokens) == (ref.text, ref.prompt_tokens)
        stop = ref.text[4:9]
        (cut,) = b.generate([GenerationRequest(_messages(images["input"]), max_new_tokens=16, stop=[stop])])
        assert (cut.text, cut.finish_reason, cut.stop) == (ref.text[:9], "stop", stop)
    # asking it to continue an assistant message: HTTP 422, reported at once, with a hint
    with OpenAIBackend(transformers_server.base_url, model, backoff_s=0.01, max_retries=3) as b:
        with pytest.raises(OpenAIServerError) as ei:
            b.generate([GenerationRequest(_messages(images["input"]), [protocol.text_part("<think>")], max_new_tokens=4)])
    e = ei.value
    assert e.status == 422 and e.attempts == 1 and "continue_final_message" in str(e) and "continuation=" in e.hint
