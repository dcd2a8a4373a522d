"""Report items: what one trajectory of a run shows, read from any of the commands' outputs.

Inputs: a trajectory JSON (``thyme run --out``), a JSONL of rows holding a ``trajectory``
(``thyme replay --out``, eval ``predictions.jsonl``), or an eval output folder. Must not import
the cli; reads trajectories through :mod:`thyme.agent.trajectory` only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ThymeError
from ..scoring.crops import target_box
from ..scoring.rules import score_answer

#: Default longest side (pixels) of embedded images.
MAX_IMAGE_SIDE = 1024


class ReportError(ThymeError):
    """The report's input cannot be read."""


# --------------------------------------------------------------------------- items


@dataclass
class ReportItem:
    """One trajectory as the report shows it.

    Attributes:
        trajectory: the :class:`thyme.agent.Trajectory` (``None``: only the row's fields are shown).
        id: identifier shown in the index.
        question: the question (default the trajectory's).
        correct: ``True`` / ``False``, or ``None`` when unknown.
        category: filter category (benchmark category, else benchmark name).
        benchmark: benchmark name.
        ground_truth: the reference answer.
        prediction: the answer as scored (default the trajectory's answer).
        error: why the sample failed, if it did.
        options: ``{letter: text}`` of a multiple-choice row (read by its benchmark's rule set).
        extra: more ``label -> value`` facts shown under the answer (strings).
        target_box: the target box ``(x1, y1, x2, y2)`` in pixels of the first input image,
            when the row carries one (eval predictions' ``target_box``, an RL record's or a
            rollout's ``bbox``, the trajectory's ``meta["bbox"]``); drawn beside the crops.
    """

    trajectory: Any = None
    id: str = ""
    question: str = ""
    correct: bool | None = None
    category: str | None = None
    benchmark: str | None = None
    ground_truth: str | None = None
    prediction: str | None = None
    error: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)
    target_box: tuple[float, float, float, float] | None = None


_GT_KEYS = ("answer_gt", "gt_answer", "ground_truth", "gt")


def to_item(obj: Any, *, base_dir: str | os.PathLike | None = None, index: int = 0) -> ReportItem:
    """Normalise a :class:`ReportItem`, a :class:`~thyme.agent.Trajectory`, a trajectory dict or
    a row dict (see the module docstring) into a :class:`ReportItem`.

    Relative image paths in a trajectory are resolved against ``base_dir``.

    Raises:
        ReportError: ``obj`` is none of these.
    """
    from ..agent.trajectory import Trajectory

    if isinstance(obj, ReportItem):
        item = obj
    elif isinstance(obj, Trajectory):
        item = ReportItem(trajectory=obj)
    elif isinstance(obj, dict):
        item = _item_from_row(obj, base_dir)
    else:
        raise ReportError(f"cannot show a {type(obj).__name__} in a report", "pass Trajectory objects, trajectory dicts or result rows")
    t = item.trajectory
    if t is not None:
        item.id = item.id or str(t.id)
        item.question = item.question or t.question
        if item.prediction is None:
            item.prediction = t.answer
        if item.error is None and t.error:
            item.error = t.error
        meta = t.meta or {}
        if not item.benchmark and meta.get("benchmark") is not None:
            item.benchmark = _str(meta["benchmark"])
        if not item.category and meta.get("category") is not None:
            item.category = _str(meta["category"])
        if item.target_box is None:
            item.target_box = target_box(meta.get("target_box", meta.get("bbox")))
        if item.ground_truth is None:
            for k in _GT_KEYS:
                if meta.get(k) is not None:
                    item.ground_truth = _str(meta[k])
                    break
    item.id = item.id or f"item-{index + 1}"
    item.category = item.category or item.benchmark
    if item.correct is None and item.ground_truth is not None and item.prediction is not None:
        item.correct = _judge(item)
    return item


def _judge(item: ReportItem) -> bool:
    """Correctness of a row that carries no verdict: its benchmark's own rule set when the row
    names a benchmark and carries its options (the rule the metric uses, so the report never
    marks correct what the metric scored wrong), else the conservative :func:`answers_agree`
    (an option rule cannot read letters it was not given)."""
    from ..evaluate.benchmarks import find_benchmark

    spec = find_benchmark(item.benchmark) if item.benchmark and item.options else None
    if spec is not None:
        v = score_answer(item.prediction, item.ground_truth, options=item.options, rule_set=spec.rule_set)
        return bool(v and v.correct)
    return answers_agree(item.prediction, item.ground_truth)


def _item_from_row(row: dict[str, Any], base_dir: str | os.PathLike | None) -> ReportItem:
    from ..agent.trajectory import Trajectory

    traj_d = row.get("trajectory") if isinstance(row.get("trajectory"), dict) else (row if "turns" in row else None)
    traj = None
    if traj_d is not None:
        try:
            traj = Trajectory.from_dict(traj_d)
        except TypeError as e:
            raise ReportError(f"malformed trajectory in row {row.get('id', row.get('question_id'))!r}: {e}") from None
        _absolute_paths(traj, base_dir)
    correct = row.get("correct", row.get("hit"))
    if correct is None and isinstance(row.get("score"), (int, float)) and not isinstance(row.get("score"), bool):
        correct = row["score"] > 0.5
    gt = next((row[k] for k in _GT_KEYS if row.get(k) is not None), None)
    if gt is None and "prediction" in row and row.get("answer") is not None:
        gt = row["answer"]  # benchmark rows: `answer` is the reference when `prediction` is the model's
    extra: dict[str, str] = {}
    if "answer_match" in row:
        extra["matches the record"] = "yes" if row.get("answer_match") else "no"
    if row.get("recorded_answer") is not None:
        extra["recorded answer"] = _str(row["recorded_answer"])
    if row.get("extracted") is not None:
        extra["extracted"] = _str(row["extracted"])
    for k in ("question_id", "stop_reason", "mask_reason", "advantage"):
        if row.get(k) is not None and traj_d is not row:
            extra[k.replace("_", " ")] = _str(row[k])
    if isinstance(row.get("reward"), dict):  # thyme train rl rollouts.jsonl: reward components
        extra["reward"] = ", ".join(f"{k} {_str(v)}" for k, v in row["reward"].items() if k in ("total", "result", "consistency", "format"))
    rid = row.get("id") if traj_d is not row else None
    if rid is None and row.get("question_id") is not None:
        rid = f"{row.get('benchmark') + '/' if row.get('benchmark') else ''}{row['question_id']}"
    return ReportItem(
        trajectory=traj,
        id=_str(rid) if rid is not None else "",
        question=_str(row.get("question")) if traj is None and row.get("question") is not None else "",
        correct=None if correct is None else bool(correct),
        category=_str(row.get("category")) if row.get("category") is not None else None,
        benchmark=_str(row.get("benchmark")) if row.get("benchmark") is not None else None,
        ground_truth=_str(gt) if gt is not None else None,
        prediction=_str(row.get("prediction")) if row.get("prediction") is not None else None,
        error=_str(row.get("error")) if row.get("error") else None,
        options={str(k): _str(v) for k, v in row["options"].items()} if isinstance(row.get("options"), dict) else {},
        extra=extra,
        target_box=target_box(row["target_box"] if row.get("target_box") is not None else row.get("bbox")),
    )


def _absolute_paths(traj: Any, base_dir: str | os.PathLike | None) -> None:
    if base_dir is None:
        return
    base = Path(base_dir)

    def fix(p: str) -> str:
        # Trajectory.save writes paths relative to the JSON file; replay rows hold paths as the
        # run saw them (relative to its working folder when --out was relative): try both.
        if not isinstance(p, str) or os.path.isabs(p):
            return p
        beside = (base / p).resolve()
        return str(beside) if beside.exists() or not Path(p).exists() else str(Path(p).resolve())

    traj.images = [fix(p) for p in traj.images]
    for t in traj.turns:
        for part in t.feedback:
            if part.get("type") == "image":
                part["image"] = fix(part["image"])
        if t.execution:
            t.execution["images"] = [fix(p) for p in t.execution.get("images", [])]


def answers_agree(prediction: str, reference: str) -> bool:
    """The conservative agreement rule (:mod:`thyme.scoring.rules` ``strict``), used only for rows
    with neither a verdict (``correct``) nor a benchmark whose rule set could decide."""
    v = score_answer(prediction, reference, rule_set="strict")
    return bool(v and v.correct)


def _str(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else str(v)


def load_items(path: str | os.PathLike, *, records: str | os.PathLike | None = None) -> list[ReportItem]:
    """Read report items from a trajectory JSON, a JSONL of rows, or an eval output folder.

    Args:
        path: see the module docstring.
        records: optional Thyme records JSONL (the file a replay ran on): their ``answer_gt``,
            ``category``, ``benchmark`` and ``bbox`` (a target box) fields are joined to rows by ``id``.

    Raises:
        ReportError: naming the file and the problem (missing, not JSON, a bad line).
    """
    p = Path(path)
    if p.is_dir():
        cand = p / "predictions.jsonl"
        if not cand.is_file():
            jsons = sorted(p.glob("*.json"))
            if not jsons:
                raise ReportError(
                    f"{p} holds no predictions.jsonl and no trajectory JSON files",
                    "pass an eval output folder, a results JSONL or a trajectory JSON",
                )
            return [to_item(_read_json(j), base_dir=j.parent, index=i) for i, j in enumerate(jsons)]
        p = cand
    if not p.is_file():
        raise ReportError(f"report input not found: {p}", "pass a trajectory JSON, a results / predictions JSONL, or an eval output folder")
    joined = _records_by_id(records) if records is not None else {}
    items: list[ReportItem] = []
    not_json = ReportError(
        f"{p} is not a JSON or JSONL file",
        "pass a trajectory JSON (thyme run --out), a results / predictions JSONL (thyme replay / eval), or an eval output folder",
    )
    if p.suffix == ".json":
        items.append(to_item(_read_json(p), base_dir=p.parent))
    else:
        from ..jsonl import JsonInputError, iter_lines_bounded, parse_line

        with p.open("rb") as f:
            lines = (ln for _, ln in iter_lines_bounded(f))  # bounded: a huge line is not held
            n = 0
            while True:
                try:
                    line = next(lines)
                except StopIteration:
                    break
                except UnicodeDecodeError:  # an image, an HTML report... passed by mistake
                    raise not_json from None
                n += 1
                if line is not None and not line.strip():
                    continue
                try:
                    row = parse_line(line, what=f"{p}, line {n}")
                except JsonInputError as e:
                    if not items:
                        raise ReportError(f"{p} is not a JSON or JSONL file (line {n}: {e.reason})", not_json.hint) from None
                    raise ReportError(f"{p}, line {n}: {e.reason}", "an interrupted run may have cut the last line: delete it") from None
                if not isinstance(row, dict):
                    raise ReportError(f"{p}, line {n}: expected a JSON object")
                rec = joined.get(str(row.get("id")))
                if rec:
                    row = {**{k: rec[k] for k in ("answer_gt", "category", "benchmark", "bbox") if k in rec}, **row}
                items.append(to_item(row, base_dir=p.parent, index=len(items)))
    return items


def _read_json(p: Path) -> Any:
    from ..jsonl import loads_bounded

    try:
        return loads_bounded(p.read_bytes(), what=str(p))
    except ValueError as e:  # invalid, not UTF-8, too large or too deep (JsonInputError)
        raise ReportError(
            f"{p} is not a JSON file ({getattr(e, 'reason', e)})",
            "pass a trajectory JSON (thyme run --out), a results / predictions JSONL, or an eval output folder",
        ) from None
    except OSError as e:
        raise ReportError(f"cannot read {p}: {e}") from None


def load_provenance(path: str | os.PathLike, items: list[ReportItem] | None = None) -> dict[str, Any]:
    """What produced the trajectories of ``path``: an eval folder's ``metrics.json`` provenance
    (beside ``predictions.jsonl``), else the model the trajectories record (``meta.model``,
    written by ``thyme run``), else ``{}``."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    metrics = folder / "metrics.json"
    if metrics.is_file() and (p.is_dir() or p.name.startswith("predictions")):
        try:
            from ..jsonl import loads_bounded

            prov = loads_bounded(metrics.read_bytes(), what=str(metrics)).get("provenance")
            if isinstance(prov, dict):
                return prov
        except (OSError, ValueError, AttributeError):
            pass
    models = []
    for it in items or []:
        m = (getattr(it.trajectory, "meta", None) or {}).get("model") if it.trajectory is not None else None
        if isinstance(m, dict) and m not in models:
            models.append(m)
    if len(models) == 1:
        return dict(models[0])
    if models:
        return {"model": ", ".join(str(m.get("model")) for m in models)}
    return {}


def _records_by_id(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    from ..jsonl import iter_jsonl

    try:
        lines = [obj for _, obj in iter_jsonl(path)]  # a bad line is a RecordError: skipped below
    except (OSError, ThymeError) as e:
        raise ReportError(f"cannot read records {path}: {e}") from None
    for r in lines:
        if isinstance(r, dict) and r.get("id") is not None:
            out[str(r["id"])] = r
    return out
