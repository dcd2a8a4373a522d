"""HR-Bench 4K and 8K (Wang et al., 2024): 200 questions each, asked four times with rotated options.

Rows are option rotations of a question (``cycle``: the data's ``cycle_category``, else
``question_id % 4`` for the corpus's consecutive rotations); accuracy is reported per cycle
and averaged over the cycles, split into ``single`` (FSP, single-instance) and ``cross``
(FCP, cross-instance), as the reference's VLMEvalKit evaluation does. Options by
VLMEvalKit's rule.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from ..data import Row, first_field
from .base import Benchmark, Scored, accuracy
from .registry import register


@dataclass(frozen=True)
class HRBench(Benchmark):
    """HR-Bench: cycles of option rotations, FSP / FCP averages."""

    def finish_row(self, row: Row, source: dict[str, Any]) -> Row:
        cyc = first_field(source, "cycle_category", "cycle")
        if cyc is not None:
            row.cycle = str(cyc)
        else:
            try:
                row.cycle = str(int(str(row.question_id)) % 4)  # corpus: consecutive rotations
            except ValueError:
                row.cycle = None
        return row

    def aggregate(self, scored: Scored) -> dict[str, Any]:
        """``{"hrbench": {average: {all, FSP, FCP}, cycles: {cycle: {group: acc}}, num_cycles}}``."""
        cycles: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        for r, _, s in scored:
            c = r.cycle if r.cycle is not None else "all"
            for group in ("all", r.category or "(none)"):
                cycles[c][group][0] += int(s.correct)
                cycles[c][group][1] += 1
        per_cycle = {c: {g: accuracy(k, n) for g, (k, n) in groups.items()} for c, groups in sorted(cycles.items())}
        average: dict[str, Any] = {}
        for group, name in (("all", "all"), ("single", "FSP"), ("cross", "FCP")):
            vals = [accs[group] for accs in per_cycle.values() if accs.get(group) is not None]
            average[name] = round(sum(vals) / len(vals), 6) if vals else None
        return {"hrbench": {"average": average, "cycles": per_cycle, "num_cycles": len(per_cycle)}}


HRBENCH_4K = register(
    HRBench(
        "hrbench4k", "HR-Bench 4K", "vlmevalkit", ("hrbench_4k", "hr_bench_4k", "hr-bench-4k", "hrbench4k"), categories=("single", "cross")
    )
)
HRBENCH_8K = register(
    HRBench(
        "hrbench8k", "HR-Bench 8K", "vlmevalkit", ("hrbench_8k", "hr_bench_8k", "hr-bench-8k", "hrbench8k"), categories=("single", "cross")
    )
)
