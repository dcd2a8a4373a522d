"""``metrics.json``: accuracy overall, per category and in each benchmark's own breakdown, plus provenance.

Layout (keys in this order)::

    {
      "overall": 0.771,                 # correct rows / all rows asked for, a fraction in [0, 1]
      "per_category": {"single": {"accuracy": 0.8, "correct": 320, "total": 400}, ...},
      "counts": {"rows": 800, "correct": 617, "wrong": 183, "failed": 2, "unparsed": 5,
                 "judged": 0, "judge_invalid": 0, "missing": 0, "unknown": 0},
      "missing": [],                    # question ids without a prediction (counted wrong)
      "benchmark": "hrbench4k",
      "hrbench": {...} | "mme_realworld": {...},   # the benchmark's standard breakdown
      "tool_use_rate": 0.12,            # rows whose trajectory executed at least one code block
      "mean_rounds": 1.4,               # generation rounds per trajectory
      "mean_code_blocks": 0.2,
      "crop_hit_rate": 0.4,             # only when rows carry a target box (see below)
      "crop_hit_rate_code": 0.8,
      "crop_hit": {"rows_with_box": 10, "hits": 4, "rows_with_box_and_code": 5},
      "provenance": {...}               # model, backend, settings, package versions, git commit
    }

Each benchmark's own breakdown comes from its :meth:`~thyme.evaluate.benchmarks.Benchmark.aggregate`
(HR-Bench: per option-rotation cycle and their mean, FSP / FCP; MME-RealWorld: task /
sub-task / category with ``Avg`` at each level, as their evaluation scripts report).

Faithful tool use (issue 19), only when predictions carry a target box (a benchmark row's
``bbox``, :func:`thyme.evaluate.runner.target_fields`): ``crop_hit_rate`` = rows whose
trajectory made a crop of the input image covering at least half (:data:`thyme.scoring.crops.HIT_THRESHOLD`)
of the target box's area / rows with a box (failed and code-free rows count as misses);
``crop_hit_rate_code`` = the same over the rows with a box whose trajectory ran code (``None``
when none did). A crop hit says the model looked at the right place, not that it answered right.

Failed samples (``error``), unparsed answers and rows without a prediction count as wrong rows;
they are never dropped (a run with 1 correct answer and 2 missing reads 1/3, not 1/1), and the
missing ones are listed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

from .benchmarks import Benchmark, Row, Score, Scored, accuracy

#: Packages whose versions go into the provenance.
PACKAGES = (
    "thyme",
    "torch",
    "transformers",
    "tokenizers",
    "accelerate",
    "numpy",
    "pillow",
    "opencv-python-headless",
    "openai",
    "httpx",
    "math-verify",
    "vllm",
    "qwen-vl-utils",
    "torchvision",
)


def score_predictions(
    spec: Benchmark,
    rows: list[Row],
    predictions: dict[str, dict[str, Any]],
    *,
    judge: Any = None,
) -> tuple[Scored, dict[str, Any]]:
    """Score every row: its prediction by the benchmark's scorer, or wrong when it has none.

    Args:
        spec: the benchmark.
        rows: the benchmark's rows asked for (the data file, or the run's selection).
        predictions: ``{row key: prediction row}``; a prediction row has ``prediction`` (the
            answer text or ``None``) and optionally ``error``.
        judge: a :class:`thyme.scoring.judge.JudgeClient` asked about unparsed answers (``None``: off).

    Returns:
        ``([(row, prediction row, Score)...] in data order, counts)``; a row without a
        prediction has an empty prediction row and a wrong :class:`Score` with rule
        ``"missing"``. Counts: ``missing`` (rows without a prediction), ``missing_keys``,
        ``unknown`` (predictions matching no row), ``judged`` and ``judge_invalid``.
    """
    by_key = {r.key: r for r in rows}
    scored: Scored = []
    missing = []
    for r in rows:
        p = predictions.get(r.key)
        if p is None:
            missing.append(r.key)
            scored.append((r, {}, Score(r.key, None, False, "missing", False)))
            continue
        scored.append((r, p, spec.score(r, p.get("prediction"), error=p.get("error"))))
    counts: dict[str, Any] = {
        "missing": len(missing),
        "missing_keys": missing,
        "unknown": sum(1 for k in predictions if k not in by_key),
        "judged": 0,
        "judge_invalid": 0,
    }
    if judge is not None:
        todo = [(r, p, s) for r, p, s in scored if s.unparsed and p.get("prediction")]
        if todo:
            from ..scoring.judge import JudgeError

            prompts = [spec.judge_prompt(r, str(p.get("prediction"))) for r, p, _ in todo]
            allowed = sorted({k for r, _, _ in todo for k in r.options} | {"Z"})
            verdicts = judge.judge_many(prompts, "option", allowed)
            for (r, _p, s), v in zip(todo, verdicts):
                if isinstance(v, JudgeError):
                    counts["judge_invalid"] += 1
                    continue
                letter = v.value if v.value in r.options or v.value == "Z" else None
                counts["judged"] += 1
                s.extracted, s.rule = letter, "judge"
                s.correct = letter is not None and letter == r.answer
    return scored, counts


def compute_metrics(
    spec: Benchmark,
    rows: list[Row],
    predictions: dict[str, dict[str, Any]],
    *,
    judge: Any = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the ``metrics.json`` dict (see the module docstring) from saved predictions.

    Every row of ``rows`` counts: rows without a prediction are wrong and listed under
    ``missing``; predictions whose question id is not in ``rows`` are counted in
    ``counts.unknown``.
    """
    scored, extra = score_predictions(spec, rows, predictions, judge=judge)
    missing_keys = extra.pop("missing_keys")
    total = len(scored)
    correct = sum(1 for _, _, s in scored if s.correct)
    cats: dict[str, list[int]] = {}
    order = list(spec.categories) + sorted({r.category or "(none)" for r, _, _ in scored} - set(spec.categories))
    for c in order:
        members = [s for r, _, s in scored if (r.category or "(none)") == c]
        if members:
            cats[c] = [sum(1 for s in members if s.correct), len(members)]
    metrics: dict[str, Any] = {
        "overall": accuracy(correct, total) if total else 0.0,
        "per_category": {c: {"accuracy": accuracy(k, n), "correct": k, "total": n} for c, (k, n) in cats.items()},
        "counts": {
            "rows": total,
            "correct": correct,
            "wrong": total - correct,
            "failed": sum(1 for _, _, s in scored if s.rule == "error"),
            "unparsed": sum(1 for _, _, s in scored if s.unparsed),
            **extra,
        },
        "missing": missing_keys,
        "benchmark": spec.name,
    }
    metrics.update(spec.aggregate(scored))
    answered = [p for _, p, _ in scored if p]
    tool = [p for p in answered if "tool_used" in p]
    rounds = [p["rounds"] for p in answered if isinstance(p.get("rounds"), (int, float))]
    blocks = [p["code_blocks"] for p in answered if isinstance(p.get("code_blocks"), (int, float))]
    metrics["tool_use_rate"] = accuracy(sum(1 for p in tool if p.get("tool_used")), len(tool)) if tool else None
    metrics["mean_rounds"] = round(sum(rounds) / len(rounds), 4) if rounds else None
    metrics["mean_code_blocks"] = round(sum(blocks) / len(blocks), 4) if blocks else None
    boxed = [p for p in answered if "crop_hit" in p]
    if boxed:
        hits = [p for p in boxed if isinstance(p.get("crop_hit"), dict) and p["crop_hit"].get("hit") is True]
        coded = [p for p in boxed if p.get("tool_used")]
        metrics["crop_hit_rate"] = accuracy(len(hits), len(boxed))
        metrics["crop_hit_rate_code"] = accuracy(len(hits), len(coded)) if coded else None
        metrics["crop_hit"] = {"rows_with_box": len(boxed), "hits": len(hits), "rows_with_box_and_code": len(coded)}
    metrics["provenance"] = provenance or {}
    return metrics


# --------------------------------------------------------------------------- provenance


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (``None`` when not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def git_commit(start: str | os.PathLike | None = None) -> dict[str, Any]:
    """The project's git commit (``commit``, ``dirty``) when thyme runs from a checkout, else ``{}``."""
    here = Path(start) if start is not None else Path(__file__).resolve().parent
    try:
        top = subprocess.run(["git", "-C", str(here), "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=10)
        if top.returncode != 0:
            return {}
        root = top.stdout.strip()
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        status = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=30
        ).stdout
        return {"commit": head or None, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {}


def file_fingerprint(path: str | os.PathLike, *, max_hash_bytes: int = 512 * 1024 * 1024) -> dict[str, Any]:
    """``{"path", "bytes", "sha256"}`` of a data file (``sha256`` only up to ``max_hash_bytes``)."""
    p = Path(path)
    out: dict[str, Any] = {"path": str(p.resolve())}
    try:
        size = p.stat().st_size
    except OSError:
        return out
    out["bytes"] = size
    if size <= max_hash_bytes:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out["sha256"] = h.hexdigest()
    return out


def base_provenance() -> dict[str, Any]:
    """What every run records: time, host, Python, package versions, project commit."""
    return {
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "git": git_commit(),
        "command": " ".join(sys.argv),
    }
