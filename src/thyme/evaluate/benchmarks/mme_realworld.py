"""MME-RealWorld and MME-RealWorld-Lite (Zhang et al., 2024): options A-E, a task tree.

Tasks Perception / Reasoning, sub-tasks such as ``Remote Sensing`` (the row's ``category``),
finer categories (``l2_category``); options by MME-RealWorld's own rule
(:func:`thyme.scoring.options.mme_extract`, no judge), accuracy per task / sub-task / category
with ``Avg`` at each level, as its evaluation script reports.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from ..data import Row
from .base import Benchmark, Scored, accuracy
from .registry import register

_CATEGORIES = ("Monitoring", "Autonomous_Driving", "OCR with Complex Context", "Diagram and Table", "Remote Sensing")


@dataclass(frozen=True)
class MMERealWorld(Benchmark):
    """MME-RealWorld: task / sub-task / category fields and the nested breakdown."""

    def finish_row(self, row: Row, source: dict[str, Any]) -> Row:
        row.category, row.task, row.l2_category = _mme_fields(row.question_id, row.category, row.task, row.l2_category)
        return row

    def aggregate(self, scored: Scored) -> dict[str, Any]:
        """``{"mme_realworld": {task: {sub-task: {category: acc, Avg, count}, Avg, count}, Overall}}``."""
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
                    s_out[cat] = accuracy(k, n)
                    k_s, n_s = k_s + k, n_s + n
                s_out["Avg"] = accuracy(k_s, n_s)
                s_out["count"] = n_s
                t_out[sub] = s_out
                k_t, n_t = k_t + k_s, n_t + n_s
            t_out["Avg"] = accuracy(k_t, n_t)
            t_out["count"] = n_t
            out[task] = t_out
            k_all, n_all = k_all + k_t, n_all + n_t
        out["Overall"] = accuracy(k_all, n_all)
        return {"mme_realworld": out}


def _mme_category(r: Row) -> str:
    cat = (r.l2_category or r.category or "(none)").lower()
    if "attribute" in cat:
        cat = cat.split("/")[0] + "/attribute"
    return cat


def _mme_fields(qid: Any, category: Any, task: Any, l2: Any) -> tuple[str | None, str | None, str | None]:
    """MME-RealWorld's task / sub-task / category from whichever fields the form carries.

    VLMEvalKit's TSV writes ``category`` as ``Task/Subtask``; the corpus JSONL keeps the
    sub-task in ``category`` and the task (in varying case) as the question id's prefix
    (``perception/ocr_cc/license/0384``), whose middle part is the finer category.
    """
    cat = None if category is None else str(category)
    if cat and "/" in cat and cat.split("/")[0].strip().lower() in _MME_TASKS:
        task = task or cat.split("/")[0]
        cat = cat.split("/", 1)[1]
    parts = str(qid).split("/")
    if task is None and len(parts) >= 2 and parts[0].strip().lower() in _MME_TASKS:
        task = parts[0]
        if l2 is None and len(parts) >= 4:
            l2 = "/".join(parts[2:-1])
    if task is not None:
        task = _MME_TASKS.get(str(task).strip().lower(), str(task).strip().capitalize())
    return cat, task, l2


#: MME-RealWorld task prefixes as they occur (the Lite re-packaging also writes ``reason/``).
_MME_TASKS = {"perception": "Perception", "reasoning": "Reasoning", "reason": "Reasoning"}


MME_REALWORLD = register(MMERealWorld("mme-realworld", "MME-RealWorld", "mme", ("mme_realworld", "mmerealworld"), categories=_CATEGORIES))
MME_REALWORLD_LITE = register(
    MMERealWorld(
        "mme-realworld-lite",
        "MME-RealWorld-Lite",
        "mme",
        ("mme_realworld_lite", "mmerealworldlite", "mme-realworld-lite"),
        categories=_CATEGORIES,
    )
)
