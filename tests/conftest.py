"""Shared fixtures: the real corpus (skipped with a reason when absent)."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import ImageFile

# The suite starts hundreds of sandboxes: none preloads the optional libraries (~2 s each) unless a
# test asks for them (tests/sandbox/test_optional_libraries.py names OPTIONAL_MODULES itself).
# Set in the environment, so the commands the tests run as subprocesses see it too.
os.environ.setdefault("THYME_SANDBOX_OPTIONAL_MODULES", "")

REPO = Path(__file__).resolve().parents[1]
#: Real material nobody on the project wrote (Thyme-7B trajectories, benchmark rows, images).
CORPUS = (REPO.parent / "shared" / "corpus").resolve()
HAVE_CORPUS = (CORPUS / "thyme" / "trajectories.jsonl").is_file()

needs_corpus = pytest.mark.skipif(
    not HAVE_CORPUS, reason=f"real corpus not found at {CORPUS} (clone the repo next to shared/corpus to run these)"
)


def corpus_records() -> list[dict]:
    """The 10 real Thyme-7B trajectories (empty when the corpus is absent)."""
    if not HAVE_CORPUS:
        return []
    return [json.loads(l) for l in (CORPUS / "thyme/trajectories.jsonl").read_text().splitlines() if l.strip()]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL checkpoint (real architecture, local tokenizer, real template)."""
    from thyme.testing.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl", arch="qwen2_5_vl", seed=0)


# ----------------------------------------------------------------- sandbox strict mode
#: CI (``CI=true``, set by .ci/run) or ``THYME_STRICT_SANDBOX=1``: a confinement layer that a
#: security test needs but the host lacks FAILS the test instead of skipping it, so a seccomp,
#: Landlock, cgroup or bubblewrap regression cannot pass as "skipped".
STRICT_SANDBOX = os.environ.get("THYME_STRICT_SANDBOX", "").lower() in ("1", "true", "yes") or os.environ.get("CI", "").lower() in (
    "1",
    "true",
    "yes",
)
#: ``THYME_TEST_NO_BWRAP=1``: run the suite as on a host without bubblewrap (find_bwrap finds none).
NO_BWRAP = os.environ.get("THYME_TEST_NO_BWRAP", "").lower() in ("1", "true", "yes")
#: Layers a strict run does not demand: bubblewrap's mount view when NO_BWRAP asks for its absence.
STRICT_EXEMPT = {"mount_view"} if NO_BWRAP else set()


def require_layer(layers, name: str) -> None:
    """Skip (or, in strict mode, fail) when layer ``name`` is not active in ``layers``."""
    by = {l.name: l for l in layers}
    layer = by.get(name)
    if layer is not None and layer.active:
        return
    why = layer.detail if layer is not None else "not reported"
    if STRICT_SANDBOX and name not in STRICT_EXEMPT:
        pytest.fail(f"strict sandbox mode (CI): required layer {name} is missing: {why}")
    pytest.skip(f"layer {name} inactive here: {why}")


@pytest.fixture(autouse=True, scope="session")
def _no_bwrap_switch():
    if not NO_BWRAP:
        yield
        return
    from thyme.sandbox import mountview

    real = mountview.find_bwrap
    mountview.find_bwrap = lambda program: None if os.sep not in program else real(program)  # as a PATH without bwrap
    try:
        yield
    finally:
        mountview.find_bwrap = real


# ----------------------------------------------------------------- a real vLLM server
#: ``THYME_REQUIRE_VLLM=1`` (``make test-vllm`` / CI): a missing vLLM environment FAILS the tests
#: that need the real server instead of skipping them.
REQUIRE_VLLM = os.environ.get("THYME_REQUIRE_VLLM", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """A real vLLM OpenAI server on loopback serving a tiny qwen2_5_vl checkpoint (head size 32,
    ``--max-model-len 8192``, ``--limit-mm-per-prompt {"image": 6}``), shared by the session:
    yields ``(base_url, model_name, checkpoint_dir)``.

    Skipped unless ``THYME_VLLM_PYTHON`` names the vLLM environment's Python (the main suite never
    starts vLLM); with ``THYME_REQUIRE_VLLM=1`` a missing environment fails instead."""
    from thyme.testing.vllm_server import VLLM_PYTHON_ENV, serve_vllm

    python = os.environ.get(VLLM_PYTHON_ENV)
    if not python:
        why = f"set {VLLM_PYTHON_ENV} to the vLLM environment's python (make venv-vllm; make test-vllm) to run the real-vLLM tests"
        if REQUIRE_VLLM:
            pytest.fail(f"THYME_REQUIRE_VLLM=1 but {why}")
        pytest.skip(why)
    if not Path(python).is_file():
        pytest.fail(f"{VLLM_PYTHON_ENV}={python} is not a file")
    from thyme.testing.tiny_checkpoint import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("vllm")
    ckpt = write_tiny_checkpoint(root / "qwen2_5_vl_hd32", arch="qwen2_5_vl", seed=0, head_dim=32)
    with serve_vllm(ckpt, python=python, served_model_name="tiny", max_model_len=8192, log_path=root / "server.log") as url:
        yield url, "tiny", ckpt


# --------------------------------------------------------------------------- image bombs


def png_1bit(w: int, h: int) -> bytes:
    """A complete, valid 1-bit PNG of ``w`` x ``h`` black pixels (every row really encoded)."""

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (w + 7) // 8)
    c = zlib.compressobj(9)
    data = b"".join(c.compress(row) for _ in range(h)) + c.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@pytest.fixture
def no_decode(monkeypatch):
    """Records every image PIL decodes (``ImageFile.load``) by its size; the bombs must not be there."""
    decoded: list[tuple[int, int]] = []
    real = ImageFile.ImageFile.load

    def load(self, *a, **k):
        decoded.append(tuple(self.size))
        return real(self, *a, **k)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return decoded
