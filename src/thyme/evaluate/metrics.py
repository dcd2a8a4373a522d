"""``metrics.json``: accuracy overall, per category and in each benchmark's own breakdown, plus provenance.

Layout (keys in this order)::

    {
      "overall": 0.771,                 # correct rows / all scored rows, a fraction in [0, 1]
      "per_category": {"single": {"accuracy": 0.8, "correct": 320, "total": 400}, ...},
      "counts": {"rows": 800, "correct": 617, "wrong": 183, "failed": 2, "unparsed": 5,
                 "judged": 0, "judge_invalid": 0, "missing": 0, "unknown": 0},
      "benchmark": "hrbench4k",
      "hrbench": {...} | "mme_realworld": {...},   # the benchmark's standard breakdown
      "tool_use_rate": 0.12,            # rows whose trajectory executed at least one code block
      "mean_rounds": 1.4,               # generation rounds per trajectory
      "mean_code_blocks": 0.2,
      "provenance": {...}               # model, backend, settings, package versions, git commit
    }

HR-Bench (VLMEvalKit ``report_acc_hrbench``): accuracy of ``all`` / ``single`` / ``cross`` rows
within each option-rotation cycle, then the mean over cycles: ``hrbench.average`` has ``all``,
``FSP`` (single-instance) and ``FCP`` (cross-instance). With every cycle complete, ``all``
equals ``overall``.

MME-RealWorld (its ``eval_your_results`` / VLMEvalKit ``get_dimension_rating``): accuracy per
task (Perception / Reasoning), per sub-task inside it and per lower-cased category inside that
(categories containing "attribute" are merged as ``<first part>/attribute``), each sub-task
and task with its ``Avg``, and ``Overall``.

Failed samples (``error``) and unparsed answers count as wrong rows; they are never dropped.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from .benchmarks import BenchmarkSpec, Row
from .scoring import Score, judge_prompt, score_prediction

#: Packages whose versions go into the provenance.
PACKAGES = ("thyme", "torch", "transformers", "tokenizers", "accelerate", "numpy", "pillow", "opencv-python-headless", "openai", "httpx", "math-verify", "vllm", "qwen-vl-utils", "torchvision")


def _acc(correct: int, total: int) -> float | None:
    return round(correct / total, 6) if total else None


def score_predictions(
    spec: BenchmarkSpec,
    rows: list[Row],
    predictions: dict[str, dict[str, Any]],
    *,
    judge: Any = None,
) -> tuple[list[tuple[Row, dict[str, Any], Score]], dict[str, int]]:
    """Score the prediction of every row that has one.

    Args:
        spec: the benchmark.
        rows: the benchmark's rows (the data file).
        predictions: ``{row key: prediction row}``; a prediction row has ``prediction`` (the
            answer text or ``None``) and optionally ``error``.
        judge: a :class:`thyme.scoring.judge.JudgeClient` asked about unparsed answers (``None``: off).

    Returns:
        ``([(row, prediction row, Score)...] in data order, counts)`` with counts
        ``missing`` (rows without a prediction), ``unknown`` (predictions matching no row),
        ``judged`` and ``judge_invalid``.
    """
    by_key = {r.key: r for r in rows}
    scored = []
    for r in rows:
        p = predictions.get(r.key)
        if p is None:
            continue
        scored.append((r, p, score_prediction(r, p.get("prediction"), spec, error=p.get("error"))))
    counts = {
        "missing": sum(1 for r in rows if r.key not in predictions),
        "unknown": sum(1 for k in predictions if k not in by_key),
        "judged": 0,
        "judge_invalid": 0,
    }
    if judge is not None:
        todo = [(r, p, s) for r, p, s in scored if s.unparsed and p.get("prediction")]
        if todo:
            from ..scoring.judge import JudgeError

            prompts = [judge_prompt(r, str(p.get("prediction"))) for r, p, _ in todo]
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
    spec: BenchmarkSpec,
    rows: list[Row],
    predictions: dict[str, dict[str, Any]],
    *,
    judge: Any = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the ``metrics.json`` dict (see the module docstring) from saved predictions.

    Rows without a prediction are not scored (counted in ``counts.missing``); predictions
    whose question id is not in ``rows`` are counted in ``counts.unknown``.
    """
    scored, extra = score_predictions(spec, rows, predictions, judge=judge)
    total = len(scored)
    correct = sum(1 for _, _, s in scored if s.correct)
    cats: dict[str, list[int]] = {}
    order = list(spec.categories) + sorted({r.category or "(none)" for r, _, _ in scored} - set(spec.categories))
    for c in order:
        members = [s for r, _, s in scored if (r.category or "(none)") == c]
        if members:
            cats[c] = [sum(1 for s in members if s.correct), len(members)]
    metrics: dict[str, Any] = {
        "overall": _acc(correct, total) if total else 0.0,
        "per_category": {c: {"accuracy": _acc(k, n), "correct": k, "total": n} for c, (k, n) in cats.items()},
        "counts": {
            "rows": total,
            "correct": correct,
            "wrong": total - correct,
            "failed": sum(1 for _, _, s in scored if s.rule == "error"),
            "unparsed": sum(1 for _, _, s in scored if s.unparsed),
            **extra,
        },
        "benchmark": spec.name,
    }
    if spec.cycles:
        metrics["hrbench"] = hrbench_breakdown(scored)
    if spec.scorer == "mme":
        metrics["mme_realworld"] = mme_breakdown(scored)
    tool = [p for _, p, _ in scored if "tool_used" in p]
    rounds = [p["rounds"] for _, p, _ in scored if isinstance(p.get("rounds"), (int, float))]
    blocks = [p["code_blocks"] for _, p, _ in scored if isinstance(p.get("code_blocks"), (int, float))]
    metrics["tool_use_rate"] = _acc(sum(1 for p in tool if p.get("tool_used")), len(tool)) if tool else None
    metrics["mean_rounds"] = round(sum(rounds) / len(rounds), 4) if rounds else None
    metrics["mean_code_blocks"] = round(sum(blocks) / len(blocks), 4) if blocks else None
    metrics["provenance"] = provenance or {}
    return metrics


def hrbench_breakdown(scored: list[tuple[Row, dict[str, Any], Score]]) -> dict[str, Any]:
    """Per-cycle accuracy (``all`` / ``single`` / ``cross``) and its mean over cycles."""
    cycles: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r, _, s in scored:
        c = r.cycle if r.cycle is not None else "all"
        for group in ("all", r.category or "(none)"):
            cycles[c][group][0] += int(s.correct)
            cycles[c][group][1] += 1
    per_cycle = {c: {g: _acc(k, n) for g, (k, n) in groups.items()} for c, groups in sorted(cycles.items())}
    average: dict[str, Any] = {}
    for group, name in (("all", "all"), ("single", "FSP"), ("cross", "FCP")):
        vals = [accs[group] for accs in per_cycle.values() if accs.get(group) is not None]
        average[name] = round(sum(vals) / len(vals), 6) if vals else None
    return {"average": average, "cycles": per_cycle, "num_cycles": len(per_cycle)}


def _mme_category(r: Row) -> str:
    cat = (r.l2_category or r.category or "(none)").lower()
    if "attribute" in cat:
        cat = cat.split("/")[0] + "/attribute"
    return cat


def mme_breakdown(scored: list[tuple[Row, dict[str, Any], Score]]) -> dict[str, Any]:
    """Task -> sub-task -> category accuracy with ``Avg`` at each level, and ``Overall``."""
    tree: dict[str, dict[str, dict[str, list[int]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: [0, 0])))
    for r, _, s in scored:
        cell = tree[r.task or "(unknown task)"][r.category or "(none)"][_mme_category(r)]
        cell[0] += int(s.correct)
        cell[1] += 1
    out: dict[str, Any] = {}
    k_all = n_all = 0
    for task in sorted(tree):
        t_out: dict[str, Any] = {}
        k_t = n_t = 0
        for sub in sorted(tree[task]):
            s_out: dict[str, Any] = {}
            k_s = n_s = 0
            for cat, (k, n) in sorted(tree[task][sub].items()):
                s_out[cat] = _acc(k, n)
                k_s, n_s = k_s + k, n_s + n
            s_out["Avg"] = _acc(k_s, n_s)
            s_out["count"] = n_s
            t_out[sub] = s_out
            k_t, n_t = k_t + k_s, n_t + n_s
        t_out["Avg"] = _acc(k_t, n_t)
        t_out["count"] = n_t
        out[task] = t_out
        k_all, n_all = k_all + k_t, n_all + n_t
    out["Overall"] = _acc(k_all, n_all)
    return out


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
        status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=30).stdout
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
