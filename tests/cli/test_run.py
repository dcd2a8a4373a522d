"""``thyme run --base-url URL --model NAME``: a question against an OpenAI-compatible server
(the project's ``thyme dev serve`` over a tiny checkpoint), through the ``openai`` backend, with
the flags and ``model:`` section of ``thyme eval --base-url``.

The dev server answers a generation request from its ``/debug/fail`` plan when one is queued
(an entry with status 200 and a chat-completion body is returned as is), so a test scripts what
the "model" says: an answer, or a code block whose crop runs in the sandbox before the server
is asked to continue the message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from thyme.cli import main

CROP = (
    "<think>Zoom in.\n<code>\n```python\nfrom PIL import Image\nimg = Image.open(image_path)\n"
    "path = '/mnt/data/temp_processed_images/crop.png'\nimg.crop((0, 0, 32, 24)).resize((64, 48)).save(path)\nprint(path)\n```\n"
)


def _image(tmp_path: Path) -> str:
    p = tmp_path / "red.png"
    Image.new("RGB", (64, 48), "red").save(p)
    return str(p)


def _said(content: str, *, stop: str | None = None) -> dict:
    """A plan entry: the server returns this chat completion instead of generating (vLLM's shape:
    a matched stop string is left out of the text and named in ``stop_reason``)."""
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop", "stop_reason": stop}
    return {"status": 200, "body": {"id": "chatcmpl-scripted", "object": "chat.completion", "model": "tiny", "choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    server_mod = pytest.importorskip("thyme.testing.openai_server")
    pytest.importorskip("thyme.backends.openai")
    with server_mod.start_server(tiny_checkpoint, served_model_name="tiny", log_dir=tmp_path_factory.mktemp("srv"), startup_timeout_s=120, extra_args=["--threads", "1"]) as s:
        yield s


@pytest.fixture()
def control(server):
    import httpx

    root = server.base_url.rsplit("/v1", 1)[0]
    httpx.post(f"{root}/debug/reset", timeout=10).raise_for_status()

    class Control:
        def plan(self, entries: list[dict]) -> None:
            httpx.post(f"{root}/debug/fail", json=entries, timeout=10).raise_for_status()

        def requests(self) -> list[dict]:
            return [r for r in httpx.get(f"{root}/debug/requests", timeout=10).json() if r["endpoint"] == "chat"]

    return Control()


def _run(server, tmp_path, *extra: str) -> list[str]:
    return ["run", "--base-url", server.base_url, "--model", "tiny", "--image", _image(tmp_path), "--question", "What colour is it?",
            "--max-pixels", "50176", "--out", str(tmp_path / "t.json"), *extra]


@pytest.mark.slow
def test_run_against_the_dev_server_answers(server, control, tmp_path, capsys):
    control.plan([_said("<think>The whole image is red.</think>\n<answer>red</answer>")])
    assert main(_run(server, tmp_path)) == 0
    out = capsys.readouterr()
    assert "answer: red" in out.out and "stop: answer" in out.err
    traj = json.loads((tmp_path / "t.json").read_text())
    assert traj["answer"] == "red" and traj["stop_reason"] == "answer"
    assert traj["meta"]["model"]["backend"] == "openai" and traj["meta"]["model"]["model"] == "tiny"
    (req,) = control.requests()
    assert req["status"] == 200 and req["body"]["model"] == "tiny"


@pytest.mark.slow
def test_run_against_the_dev_server_runs_code_and_continues(server, control, tmp_path, capsys):
    """Round 1 writes a crop; the sandbox runs it; round 2 (the continued message) answers."""
    control.plan([_said(CROP, stop="</code>"), _said("The crop is red too.</think>\n<answer>red</answer>")])
    assert main(_run(server, tmp_path, "--max-rounds", "3")) == 0
    assert "answer: red" in capsys.readouterr().out
    traj = json.loads((tmp_path / "t.json").read_text())
    assert traj["answer"] == "red" and traj["stop_reason"] == "answer"
    first, second = traj["turns"]
    assert first["execution"]["ok"] and first["execution"]["stdout"].strip() == "/mnt/data/temp_processed_images/crop.png"
    (crop,) = first["execution"]["images"]
    with Image.open(tmp_path / crop) as im:  # saved beside the trajectory
        assert im.size == (64, 48)
    reqs = control.requests()
    assert len(reqs) == 2 and reqs[1]["body"].get("continue_final_message") is True  # the server continued the assistant message


@pytest.mark.slow
def test_run_against_the_dev_server_generating(server, control, tmp_path, capsys):
    """No script: the tiny model itself generates (a few random tokens); the image reached it."""
    assert main(_run(server, tmp_path, "--max-new-tokens", "4", "--max-rounds", "1", "--config", _yaml(tmp_path, "model:\n  timeout_s: 120\n  image_format: png\n"))) == 0
    traj = json.loads((tmp_path / "t.json").read_text())
    assert traj["stop_reason"] != "error" and traj["meta"]["model"]["image_format"] == "png" and traj["meta"]["model"]["timeout_s"] == 120
    (req,) = control.requests()
    images = [p["image"] for m in req["body"]["messages"] for p in (m["content"] if isinstance(m["content"], list) else []) if "image" in p]
    assert req["status"] == 200 and images and images[0]["mime"] == "image/png"


def _yaml(tmp_path: Path, text: str) -> str:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return str(p)


# --------------------------------------------------------------------------- bad command lines (no server)


@pytest.mark.parametrize(
    "extra, yaml_text, message",
    [
        (["--dtype", "bfloat16"], None, "--dtype do(es) not apply to the openai backend"),
        ([], "model:\n  dtype: bfloat16\n", "'dtype'"),
        ([], "model:\n  continuation: sglang\n  bogus: 1\n", "'bogus'"),
    ],
)
def test_run_base_url_settings_are_checked_before_anything_starts(tmp_path, capsys, monkeypatch, extra, yaml_text, message):
    monkeypatch.setattr("thyme.sandbox.Sandbox.__init__", lambda *a, **k: pytest.fail("the sandbox started"))
    argv = ["run", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--image", _image(tmp_path), "--question", "q", *extra]
    if yaml_text:
        argv += ["--config", _yaml(tmp_path, yaml_text)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_run_with_a_model_rejects_server_settings(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("thyme.backends.hf.HFBackend.__init__", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["run", "--model", "m", "--image", _image(tmp_path), "--question", "q", "--continuation", "sglang"]) == 2
    assert "--continuation do(es) not apply to the hf backend (--model ID)" in capsys.readouterr().err


def test_run_base_url_builds_the_openai_backend_with_the_model_section_and_key(tmp_path, monkeypatch):
    """The flags and the model section reach the backend as eval's do; the key from the environment."""
    made = {}

    class Stop(Exception):
        pass

    def fake(base_url, model, **kw):
        made.update(base_url=base_url, model=model, **kw)
        raise Stop

    import thyme.backends.openai as openai_mod

    monkeypatch.setattr(openai_mod, "OpenAIBackend", fake)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    argv = ["run", "--base-url", "http://127.0.0.1:9/v1", "--model", "served", "--image", _image(tmp_path), "--question", "q", "--no-send-stop",
            "--config", _yaml(tmp_path, "model:\n  continuation: sglang\n  concurrency: 2\n  max_pixels: 50176\n")]
    with pytest.raises(Stop):
        main(argv)
    assert made == {"base_url": "http://127.0.0.1:9/v1", "model": "served", "api_key": "sk-env", "continuation": "sglang", "concurrency": 2, "max_pixels": 50176, "send_stop": False}
