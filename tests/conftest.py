"""Shared fixtures: the real corpus (skipped with a reason when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
