"""Access to ``thyme serve``: loopback by default; a non-loopback bind needs an API key; with a key
set, every request needs ``Authorization: Bearer KEY`` (401 otherwise)."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from thyme.errors import ThymeError
from thyme.serve.server import api_key, check_access, is_loopback

from .conftest import running_server, user_message

KEY = "k" * 24


def test_with_a_key_every_request_needs_it(scripted, sandbox):
    with running_server(scripted, sandbox, api_key=KEY) as srv:
        for headers in ({}, {"Authorization": "Bearer wrong-key-wrong-key"}, {"Authorization": KEY}):
            for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
                r = httpx.request(method, srv.url + path, headers=headers, json={"messages": user_message()}, timeout=30)
                assert r.status_code == 401, (headers, path)
                assert r.json()["error"]["type"] == "authentication_error"
        assert not scripted.requests
        r = httpx.post(
            srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={"messages": user_message()}, timeout=60
        )
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "B"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "::1", "localhost"])
def test_loopback_needs_no_key(host):
    assert is_loopback(host)
    check_access(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.4", "example.com", ""])
def test_binding_elsewhere_without_a_key_is_refused(host):
    with pytest.raises(ThymeError, match="without an API key"):
        check_access(host, None)
    check_access(host, KEY)


def test_the_key_comes_from_the_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("THYME_SERVE_API_KEY", raising=False)
    assert api_key(None) is None
    monkeypatch.setenv("THYME_SERVE_API_KEY", KEY)
    assert api_key(None) == KEY
    f = tmp_path / "key"
    f.write_text("f" * 20 + "\n")
    assert api_key(str(f)) == "f" * 20  # the file wins
    f.write_text("short\n")
    with pytest.raises(ThymeError, match="fewer than"):
        api_key(str(f))
    f.write_text("")
    with pytest.raises(ThymeError, match="empty"):
        api_key(str(f))
    with pytest.raises(ThymeError, match="cannot read"):
        api_key(str(tmp_path / "missing"))


def test_the_command_refuses_0_0_0_0_without_a_key_before_loading():
    env = {k: v for k, v in os.environ.items() if k != "THYME_SERVE_API_KEY"}
    r = subprocess.run(
        [sys.executable, "-m", "thyme.cli", "serve", "--model", "/nonexistent/model", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "refusing to bind '0.0.0.0' without an API key" in r.stderr
