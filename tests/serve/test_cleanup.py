"""A request's folder is removed after its answer, in a thread: a slow disk never holds the
response nor stalls the event loop the other requests use; the folder is still removed."""

from __future__ import annotations

import os
import shutil
import threading

import httpx

from .conftest import running_server, user_message
from .test_disconnects import _until


def test_a_slow_folder_removal_holds_neither_the_answer_nor_the_server(scripted, sandbox, monkeypatch):
    real = shutil.rmtree
    held, removing, removed = threading.Event(), [], []

    def slow_rmtree(path, *a, **kw):
        if os.path.basename(str(path)).startswith("thyme-serve-"):  # a request's folder (not the sandbox's)
            removing.append(str(path))
            assert held.wait(30)
            real(path, *a, **kw)
            removed.append(str(path))
            return None
        return real(path, *a, **kw)

    monkeypatch.setattr(shutil, "rmtree", slow_rmtree)
    with running_server(scripted, sandbox) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": user_message()}, timeout=60)
        assert r.json()["choices"][0]["message"]["content"] == "B"  # answered while its folder's removal waits
        _until(lambda: removing, "the folder's removal never started")
        assert os.path.isdir(removing[0]) and not removed
        assert httpx.get(srv.url + "/health", timeout=10).json()["running"] == 0  # the event loop is free
        held.set()
        _until(lambda: removed, "the folder was never removed")
    assert not os.path.exists(removing[0])
