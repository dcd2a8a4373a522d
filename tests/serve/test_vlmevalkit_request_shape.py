"""VLMEvalKit's ``run.py --base-url URL --model NAME --local-media`` against a real ``thyme serve``.

The request shape is VLMEvalKit's own, read from open-compass/VLMEvalKit at commit
e8e78f05f3080fe28154f2130321f17951c3be94 (``vlmeval/api/lmdeploy.py``: ``LMDeployWrapper``,
``prepare_itlist`` / ``prepare_inputs``; ``vlmeval/api/openai_sdk.py``:
``OpenAISDKWrapper.generate_inner``; ``run.py``: ``build_model_from_base_url``):

- ``POST {base_url}/chat/completions`` (no ``/v1/models`` call first) with ``requests``, headers
  ``Content-Type: application/json`` and ``Authorization: Bearer sk-admin`` (``--key``'s default;
  ``$LMDEPLOY_API_KEY`` wins over it);
- body ``{"model": NAME, "messages": [{"role": "user", "content": [...]}], "n": 1,
  "max_tokens": 32768, "temperature": 0.0}`` (``--max-tokens`` default ``2**15``; the wrapper's
  temperature 0.0; ``top_k`` / ``top_p`` / ``repetition_penalty`` only when given); no system
  message unless the dataset has one;
- each image ``{"type": "image_url", "image_url": {"url": "file://" + str(Path(p).resolve())}}``
  (the absolute path pasted after ``file://``, **not** percent-encoded), text parts
  ``{"type": "text", "text": ...}``, in the dataset's order (images first, then the question).

Sent both with ``requests`` (byte for byte as VLMEvalKit) and with the ``openai`` SDK (the same
JSON), to a real uvicorn server over the scripted backend with ``allow_path`` set.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import QUESTION, png_bytes, running_server

#: What VLMEvalKit's run.py sends when neither --key nor $LMDEPLOY_API_KEY is given.
VLMEVALKIT_DEFAULT_KEY = "sk-admin"


def vlmevalkit_payload(model: str, image_paths: list[str], question: str) -> dict:
    """The JSON body of one VLMEvalKit ``--local-media`` request (module docstring)."""
    content = [{"type": "image_url", "image_url": {"url": f"file://{Path(p).resolve()}"}} for p in image_paths]
    content.append({"type": "text", "text": question})
    return {"model": model, "messages": [{"role": "user", "content": content}], "n": 1, "max_tokens": 2**15, "temperature": 0.0}


def post_like_vlmevalkit(base_url: str, payload: dict, key: str = VLMEVALKIT_DEFAULT_KEY):
    """``OpenAISDKWrapper.generate_inner``'s call: ``requests.post`` of ``json.dumps(payload)``."""
    import requests

    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    return requests.post(f"{base_url.rstrip('/')}/chat/completions", headers=headers, data=json.dumps(payload), timeout=120)


def post_with_openai_sdk(base_url: str, payload: dict, key: str = VLMEVALKIT_DEFAULT_KEY):
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)
    return client.chat.completions.create(**payload)


@pytest.fixture
def lmudata(tmp_path):
    """A VLMEvalKit-like LMUData root: ``images/<DATASET>/<index>.jpg`` (here PNG bytes), one file
    name with a space, ``#`` and ``%`` (VLMEvalKit does not percent-encode its file:// URLs)."""
    root = tmp_path / "LMUData"
    folder = root / "images" / "MMStar"
    folder.mkdir(parents=True)
    (folder / "17.jpg").write_bytes(png_bytes())
    (folder / "odd name #2 100%.jpg").write_bytes(png_bytes((40, 40)))
    return root


@pytest.mark.parametrize("send", [post_like_vlmevalkit, post_with_openai_sdk], ids=["requests", "openai-sdk"])
def test_vlmevalkit_local_media_request_gets_the_answer(send, scripted, sandbox, lmudata):
    with running_server(scripted, sandbox, allow_path=[str(lmudata)]) as srv:
        payload = vlmevalkit_payload("thyme-test", [str(lmudata / "images" / "MMStar" / "17.jpg")], QUESTION)
        r = send(srv.url + "/v1", payload)
        body = r.json() if hasattr(r, "status_code") else r.model_dump()
        if hasattr(r, "status_code"):
            assert r.status_code == 200, r.text
        # what VLMEvalKit keeps: resp['choices'][0]['message']['content'].strip()
        assert body["choices"][0]["message"]["content"].strip() == "B"
        assert body["thyme"]["stop_reason"] == "answer"
    # the model saw the question and an image read from the allowed root
    assert scripted.requests and QUESTION in json.dumps(scripted.requests[0].messages)


def test_an_unencoded_file_url_with_odd_characters_is_read(scripted, sandbox, lmudata):
    """VLMEvalKit pastes the path after ``file://`` as is: a ``#``, ``%`` or space in it is part of
    the file name, not a fragment or an escape."""
    odd = lmudata / "images" / "MMStar" / "odd name #2 100%.jpg"
    with running_server(scripted, sandbox, allow_path=[str(lmudata)]) as srv:
        r = post_like_vlmevalkit(srv.url + "/v1", vlmevalkit_payload("thyme-test", [str(odd)], QUESTION))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "B"


def test_a_path_outside_the_allowed_root_is_refused_with_400(scripted, sandbox, lmudata, tmp_path):
    from openai import BadRequestError

    secret = tmp_path / "secret.jpg"
    secret.write_bytes(png_bytes())
    escape = lmudata / "images" / "MMStar" / ".." / ".." / ".." / "secret.jpg"  # resolve() collapses it: outside
    with running_server(scripted, sandbox, allow_path=[str(lmudata)]) as srv:
        for path in (secret, escape):
            r = post_like_vlmevalkit(srv.url + "/v1", vlmevalkit_payload("thyme-test", [str(path)], QUESTION))
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "allow_path"
        with pytest.raises(BadRequestError) as e:
            post_with_openai_sdk(srv.url + "/v1", vlmevalkit_payload("thyme-test", [str(secret)], QUESTION))
        assert e.value.body["param"] == "allow_path"
    with running_server(scripted, sandbox) as srv:  # no --allow-path at all: no local file is read
        r = post_like_vlmevalkit(
            srv.url + "/v1", vlmevalkit_payload("thyme-test", [str(lmudata / "images" / "MMStar" / "17.jpg")], QUESTION)
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "allow_path"
    assert not scripted.requests  # nothing reached the model


def test_file_url_forms(lmudata, tmp_path):
    """``file:///p`` and ``file://localhost/p`` name this machine; a percent-encoded path is
    decoded (RFC 8089); another host is refused."""
    from urllib.parse import quote

    from thyme.serve import RequestError, ServeConfig
    from thyme.serve.inputs import parse_request

    cfg = ServeConfig(allow_path=[str(lmudata)])
    odd = lmudata / "images" / "MMStar" / "odd name #2 100%.jpg"
    out = tmp_path / "req"
    out.mkdir()

    def parse(url):
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "q"}]}]
        return parse_request({"messages": msgs}, cfg, out)

    for url in (f"file://localhost{odd}", f"file://{quote(str(odd))}", f"file://{odd}"):
        assert open(parse(url).images[0], "rb").read() == odd.read_bytes(), url
    with pytest.raises(RequestError) as e:
        parse(f"file://evil.example{odd}")
    assert e.value.status == 400 and "host" in e.value.message
