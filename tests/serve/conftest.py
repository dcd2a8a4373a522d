"""Fixtures of the ``thyme serve`` tests: a real uvicorn server on a free loopback port, in this
process, over the scripted backend (``thyme.testing.scripted``) and the real sandbox."""

from __future__ import annotations

import base64
import io
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from PIL import Image, ImageDraw

QUESTION = "What is written on the sign?"
CROP = (
    "<think>Zoom in.\n<code>\n```python\nfrom PIL import Image\nimg = Image.open(image_path)\n"
    "img.crop((0, 0, 32, 24)).save('/mnt/data/temp_processed_images/crop.png')\n"
    "print('/mnt/data/temp_processed_images/crop.png')\n```\n</code>"
)
ANSWER = "<think>The sign reads STOP.</think>\n<answer>B</answer>"


def png_bytes(size=(64, 48)) -> bytes:
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).rectangle((8, 8, 40, 30), fill="red")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes | None = None) -> str:
    return "data:image/png;base64," + base64.b64encode(raw if raw is not None else png_bytes()).decode()


def user_message(question: str = QUESTION, url: str | None = None) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url or data_url()}}, {"type": "text", "text": question}]}
    ]


@pytest.fixture(scope="session")
def tokenizer(tiny_checkpoint):
    from thyme.backends.processors import load_processor

    return load_processor(str(tiny_checkpoint), max_pixels=12544).tokenizer


@pytest.fixture(scope="session")
def sandbox():
    from thyme.sandbox import Sandbox

    with Sandbox() as sb:
        yield sb


@contextmanager
def running_server(backend, sandbox, *, api_key=None, local=False, agent=None, **serve):
    """A real uvicorn server over ``backend`` on a free loopback port; yields its base URL and service."""
    import uvicorn

    from thyme.agent import AgentConfig
    from thyme.serve import ServeConfig, Service
    from thyme.serve.app import build_app
    from thyme.serve.server import bind

    cfg = ServeConfig(port=0, **serve)
    service = Service(backend, sandbox, agent or AgentConfig(max_new_tokens=400), cfg, model_name="thyme-test", local=local)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(build_app(service, api_key=api_key), log_level="warning", access_log=False))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not t.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{sock.getsockname()[1]}", service=service, server=server, thread=t)
    finally:
        server.should_exit = True
        t.join(30)
        sock.close()
        service.close()


@pytest.fixture
def scripted(tokenizer):
    from thyme.testing.scripted import ScriptedBackend

    return ScriptedBackend(tokenizer, [CROP, ANSWER])
