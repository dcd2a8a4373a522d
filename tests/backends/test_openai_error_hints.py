"""Hints of the OpenAI backend's HTTP errors for the 400s a real vLLM server answers (issue 17).

The bodies are vLLM 0.32.0's own, captured from `python -m vllm.entrypoints.openai.api_server`
(CPU build) serving a tiny checkpoint with ``--max-model-len 8192 --limit-mm-per-prompt
'{"image": 6}'``; tests/backends/test_openai_against_vllm.py sees them end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from thyme.backends.openai import OpenAIBackend

URL = "http://127.0.0.1:8000/v1/chat/completions"


def vllm_400(message: str, param: str | None) -> SimpleNamespace:
    body = {"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}}
    return SimpleNamespace(status_code=400, text=json.dumps(body), headers={})


@pytest.mark.parametrize(
    "message, param, names, not_names",
    [
        # too many images for the server's --limit-mm-per-prompt: nothing to do with pixels or tokens
        (
            "At most 6 image(s) may be provided in one prompt. (parameter=image)",
            "image",
            ["max_images", "--limit-mm-per-prompt"],
            ["max_pixels"],
        ),
        # max_tokens over the context: the token budget, not the images ("too large" used to blame max_pixels)
        (
            "max_tokens=9000 cannot be greater than max_model_len=8192. Please request fewer output tokens. (parameter=max_tokens, value=9000)",
            "max_tokens",
            ["--max-new-tokens", "--max-model-len"],
            ["max_pixels"],
        ),
        (
            "max_tokens is too large: 9000. This model supports at most 4096 completion tokens.",
            "max_tokens",
            ["--max-new-tokens"],
            ["max_pixels"],
        ),
        # a prompt over the context (a large image at the checkpoint's own pixel budget)
        ("Input length (11479) exceeds model's maximum context length (8192).", None, ["max_pixels", "--max-model-len"], []),
    ],
)
def test_vllm_400s_get_a_hint_naming_the_setting_to_change(message, param, names, not_names):
    b = OpenAIBackend("http://127.0.0.1:8000/v1", "tiny")
    try:
        e = b._http_error(URL, vllm_400(message, param), 1)
    finally:
        b.close()
    assert e.status == 400 and not e.retryable
    assert "HTTP 400" in str(e) and message in str(e)  # the server's own words reach the user
    for n in names:
        assert n in (e.hint or ""), e.hint
    for n in not_names:
        assert n not in (e.hint or ""), e.hint
