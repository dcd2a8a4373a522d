"""The report's pages with plots: an eval run's summary, two eval runs compared, an RL run's curves.

- :func:`write_summary` (``thyme report EVAL_DIR``): accuracy by category, by number of rounds,
  with and without tool use; stop reasons; latency and generated tokens per question; the
  metrics table. Read from ``predictions.jsonl`` and ``metrics.json`` (``thyme eval --out``).
- :func:`write_comparison` (``thyme report RUN_A RUN_B``): overall and per-category accuracy
  side by side with the difference (B - A), and the questions that flipped (right -> wrong,
  wrong -> right), each linked to both trajectories, rendered inline in the page (anchors
  ``a-N`` / ``b-N``). Rows are matched by their key (``benchmark/question_id``); the runs must
  be of the same benchmark.
- :func:`write_training` (``thyme report OUTPUT_DIR`` of ``thyme train rl``): per-step curves
  from TRL's ``trainer_state.json`` ``log_history`` (``reward``, ``thyme/rewards/*``,
  ``thyme/tool_use_rate``, ``thyme/rounds``, ``completions/mean_length``,
  ``thyme/masked_rollouts``), completed from ``rollouts.jsonl`` (reward components, tool use,
  rounds, model tokens and masked rollouts by reason per step) when the log lacks a series; the
  logged ``loss`` (and ``kl``) as well, so an SFT output folder shows its loss curve.

Inputs are data: a bad line is skipped and counted (shown on the page), images are embedded only
from inside the runs rendered (:class:`~thyme.report.render._Embedder` roots). Plots are
matplotlib PNG data URLs (:mod:`thyme.report.plots`).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

from .items import MAX_IMAGE_SIDE, ReportError, to_item
from .plots import Plot, bars, histogram, lines

# --------------------------------------------------------------------------- reading


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(rows, bad lines skipped) of a JSONL; bounded line length and depth."""
    from ..errors import ThymeError
    from ..jsonl import iter_jsonl

    rows, bad = [], 0
    try:
        for _, obj in iter_jsonl(path):
            if isinstance(obj, dict):
                rows.append(obj)
            else:
                bad += 1
    except UnicodeDecodeError:
        raise ReportError(f"{path} is not a JSONL file", "pass a folder written by thyme eval --out or thyme train rl") from None
    except ThymeError as e:
        raise ReportError(f"cannot read {path}: {e}") from None
    return rows, bad


def _read_json(path: Path) -> Any:
    from ..jsonl import loads_bounded

    try:
        return loads_bounded(path.read_bytes(), what=str(path))
    except (OSError, ValueError) as e:
        raise ReportError(f"{path} is not a readable JSON file ({getattr(e, 'reason', e)})") from None


def is_eval_folder(path: str | os.PathLike) -> bool:
    """A folder written by ``thyme eval --out`` (``predictions.jsonl`` and ``metrics.json``)."""
    p = Path(path)
    return p.is_dir() and (p / "predictions.jsonl").is_file() and (p / "metrics.json").is_file()


def trainer_state_path(path: str | os.PathLike) -> Path | None:
    """``trainer_state.json`` of an RL output folder (the folder's, else the latest checkpoint's)."""
    p = Path(path)
    if (p / "trainer_state.json").is_file():
        return p / "trainer_state.json"
    ckpts = []
    for c in p.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", c.name)
        if m and (c / "trainer_state.json").is_file():
            ckpts.append((int(m.group(1)), c / "trainer_state.json"))
    return max(ckpts)[1] if ckpts else None


def is_training_folder(path: str | os.PathLike) -> bool:
    """An output folder of ``thyme train rl`` (``rollouts.jsonl`` or a ``trainer_state.json``), not an eval folder."""
    p = Path(path)
    return (
        p.is_dir() and not (p / "predictions.jsonl").is_file() and ((p / "rollouts.jsonl").is_file() or trainer_state_path(p) is not None)
    )


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _traj(row: dict[str, Any]) -> dict[str, Any]:
    t = row.get("trajectory")
    return t if isinstance(t, dict) else {}


def _turns(t: dict[str, Any]) -> list[dict[str, Any]]:
    turns = t.get("turns")
    return [x for x in turns if isinstance(x, dict)] if isinstance(turns, list) else []


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


#: Most bars one chart shows; the smaller groups beyond them are pooled as "other".
MAX_BARS = 30


def row_key(row: dict[str, Any]) -> str:
    """The key that matches a prediction row across runs: ``key``, else ``benchmark/question_id``."""
    if isinstance(row.get("key"), str) and row["key"]:
        return row["key"]
    return f"{row.get('benchmark') or ''}/{row.get('question_id')}"


def row_facts(row: dict[str, Any]) -> dict[str, Any]:
    """What the summary plots of one prediction row: ``correct`` (bool / None), ``category``,
    ``rounds`` (int), ``tool`` (bool), ``stop`` (str), ``latency_s`` (the trajectory's
    ``timings.total_s`` or None) and ``tokens`` (generated tokens over its turns or None)."""
    t = _traj(row)
    turns = _turns(t)
    rounds = _num(row.get("rounds"))
    if rounds is None:
        rounds = sum(1 for x in turns if isinstance(x.get("index"), int) and x["index"] >= 0)
    tool = row.get("tool_used")
    if not isinstance(tool, bool):
        tool = any(x.get("execution") for x in turns)
    timings = t.get("timings") if isinstance(t.get("timings"), dict) else {}
    toks = [_num(x.get("num_tokens")) for x in turns]
    toks = [x for x in toks if x is not None]
    correct = row.get("correct")
    return {
        "correct": correct if isinstance(correct, bool) else None,
        "category": str(row.get("category")) if row.get("category") is not None else "(none)",
        "rounds": int(rounds) if abs(rounds) < 1e9 else -1,
        "tool": bool(tool),
        "stop": str(row.get("stop_reason") or t.get("stop_reason") or "(none)"),
        "latency_s": _num(timings.get("total_s")),
        "tokens": sum(toks) if toks and any(toks) else None,
    }


def _acc(facts: list[dict[str, Any]]) -> float | None:
    return sum(1 for f in facts if f["correct"]) / len(facts) if facts else None


def _group(facts: list[dict[str, Any]], key: str, order: Iterable[Any] | None = None) -> list[tuple[Any, list[dict[str, Any]]]]:
    groups: dict[Any, list[dict[str, Any]]] = {}
    for f in facts:
        groups.setdefault(f[key], []).append(f)
    order = list(order or [])
    keys = [k for k in order if k in groups] + sorted((k for k in groups if k not in set(order)), key=str)
    out = [(k, groups[k]) for k in keys]
    if len(out) > MAX_BARS:  # hostile or very fine-grained data: the largest groups, the rest pooled
        big = {k for k, v in sorted(out, key=lambda kv: -len(kv[1]))[: MAX_BARS - 1]}
        rest = [f for k, v in out if k not in big for f in v]
        out = [(k, v) for k, v in out if k in big] + [("other", rest)]
    return out


def _load_eval(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    metrics = _read_json(folder / "metrics.json")
    if not isinstance(metrics, dict):
        raise ReportError(f"{folder / 'metrics.json'} is not a metrics file (expected a JSON object)")
    rows, bad = _read_jsonl(folder / "predictions.jsonl")
    return metrics, rows, bad


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


# --------------------------------------------------------------------------- the pages


def summary_plots(rows: list[dict[str, Any]], category_order: Iterable[str] = ()) -> list[Plot]:
    """The summary's figures of prediction rows (see the module docstring); a figure whose data
    no row carries (latency, tokens) is left out."""
    facts = [row_facts(r) for r in rows]
    plots = []
    g = _group(facts, "category", category_order)
    plots.append(
        bars(
            "Accuracy by category",
            [k for k, _ in g],
            {"accuracy": [_acc(v) for _, v in g]},
            notes=[f"n={len(v)}" for _, v in g],
            percent=True,
            caption="share of questions answered correctly in each category (n: questions)",
        )
    )
    g = _group(facts, "rounds")
    plots.append(
        bars(
            "Accuracy by number of rounds",
            [k for k, _ in g],
            {"accuracy": [_acc(v) for _, v in g]},
            notes=[f"n={len(v)}" for _, v in g],
            percent=True,
            caption="questions grouped by the generation rounds their trajectory took",
        )
    )
    g = _group(facts, "tool", [False, True])
    plots.append(
        bars(
            "Accuracy with and without tool use",
            ["code run" if k else "no code" for k, _ in g],
            {"accuracy": [_acc(v) for _, v in g]},
            notes=[f"n={len(v)}" for _, v in g],
            percent=True,
            caption="questions whose trajectory executed at least one code block, and the others",
        )
    )
    g = sorted(_group(facts, "stop"), key=lambda kv: -len(kv[1]))
    plots.append(
        bars(
            "Stop reasons",
            [k for k, _ in g],
            {"questions": [len(v) for _, v in g], "correct": [sum(1 for f in v if f["correct"]) for _, v in g]},
            ylabel="questions",
            caption="why each trajectory ended (answer, max_rounds, error, ...), and how many of them were correct",
        )
    )
    lat = [f["latency_s"] for f in facts if f["latency_s"] is not None]
    if lat:
        plots.append(
            histogram("Latency per question", lat, xlabel="seconds (trajectory total)", caption=f"{len(lat)} questions with timings")
        )
    tok = [f["tokens"] for f in facts if f["tokens"] is not None]
    if tok:
        plots.append(
            histogram(
                "Generated tokens per question", tok, xlabel="tokens over all rounds", caption=f"{len(tok)} questions with token counts"
            )
        )
    return plots


def write_summary(
    folder: str | os.PathLike,
    out_html: str | os.PathLike,
    *,
    title: str | None = None,
    source: str | None = None,
) -> Path:
    """Write the summary page of an eval folder (``predictions.jsonl`` + ``metrics.json``).

    Returns the written path. Raises :class:`ReportError` when the folder's files cannot be read.
    """
    folder = Path(folder)
    metrics, rows, bad = _load_eval(folder)
    plots = summary_plots(rows, [str(c) for c in _dict(metrics.get("per_category"))])
    counts = _dict(metrics.get("counts"))
    bench = str(metrics.get("benchmark") or "eval")
    overall = _num(metrics.get("overall"))
    table = [("overall", _pct(overall), f"{counts.get('correct', '?')}/{counts.get('rows', len(rows))}")]
    for c, v in _dict(metrics.get("per_category")).items():
        if isinstance(v, dict):
            table.append((str(c), _pct(_num(v.get("accuracy"))), f"{v.get('correct', '?')}/{v.get('total', '?')}"))
    facts = [("questions", str(len(rows)))]
    for k in ("failed", "unparsed", "missing"):
        if counts.get(k):
            facts.append((k, str(counts[k])))
    for k, label in (
        ("tool_use_rate", "tool use rate"),
        ("mean_rounds", "mean rounds"),
        ("mean_code_blocks", "mean code blocks"),
        ("crop_hit_rate", "crop hit rate (a crop covers >= half of the target box)"),
        ("crop_hit_rate_code", "crop hit rate, rows that used code"),
    ):
        v = _num(metrics.get(k))
        if v is not None:
            facts.append((label, _pct(v) if k in ("tool_use_rate", "crop_hit_rate", "crop_hit_rate_code") else f"{v:g}"))
    if bad:
        facts.append(("unreadable prediction lines (skipped)", str(bad)))
    from .render import provenance_lines, render_page

    prov = metrics.get("provenance") if isinstance(metrics.get("provenance"), dict) else {}
    return render_page(
        out_html,
        page="summary",
        title=title or f"{bench}: {_pct(overall)} summary",
        source=source,
        provenance=provenance_lines(prov),
        plots=plots,
        table=table,
        facts=facts,
        trajectories_link="report.html"
        if (folder / "report.html").is_file() and Path(out_html).resolve().parent == folder.resolve()
        else None,
    )


def _run_name(folder: Path) -> str:
    return folder.resolve().name or str(folder)


def write_comparison(
    run_a: str | os.PathLike,
    run_b: str | os.PathLike,
    out_html: str | os.PathLike,
    *,
    title: str | None = None,
    source: str | None = None,
    max_image_side: int = MAX_IMAGE_SIDE,
    allow_absolute: bool = False,
    max_flipped: int | None = None,
) -> Path:
    """Write the comparison page of two eval folders of the same benchmark (module docstring).

    Args:
        max_flipped: render at most this many flipped questions' trajectories per direction
            (all are listed; ``None``: all rendered).

    Raises:
        ReportError: a folder is not an eval folder, or the runs are of different benchmarks
            or share no question.
    """
    from .render import _Embedder, _item_view, provenance_lines, render_page

    a, b = Path(run_a), Path(run_b)
    for p in (a, b):
        if not is_eval_folder(p):
            raise ReportError(
                f"{p} is not an eval output folder (predictions.jsonl and metrics.json)", "pass two folders written by thyme eval --out"
            )
    ma, ra, bad_a = _load_eval(a)
    mb, rb, bad_b = _load_eval(b)
    if ma.get("benchmark") != mb.get("benchmark"):
        raise ReportError(
            f"{a} is a {ma.get('benchmark')!r} run and {b} a {mb.get('benchmark')!r} run; only runs of the same benchmark compare",
            "pass two eval folders of one benchmark",
        )
    name_a, name_b = _run_name(a), _run_name(b)
    if name_a == name_b:
        name_a, name_b = f"A ({name_a})", f"B ({name_b})"
    by_a = {row_key(r): r for r in ra}
    by_b = {row_key(r): r for r in rb}
    common = [k for k in by_a if k in by_b]
    if not common:
        raise ReportError(f"{a} and {b} share no question", "compare two runs over the same benchmark data")
    fa = {k: row_facts(by_a[k]) for k in common}
    fb = {k: row_facts(by_b[k]) for k in common}
    order = [str(c) for c in _dict(ma.get("per_category"))]
    cats = [c for c, _ in _group(list(fa.values()), "category", order)]
    table = []
    for label, keys in [("overall", common)] + [(c, [k for k in common if fa[k]["category"] == c]) for c in cats]:
        acc_a = _acc([fa[k] for k in keys])
        acc_b = _acc([fb[k] for k in keys])
        diff = None if acc_a is None or acc_b is None else acc_b - acc_a
        table.append(
            {
                "label": label,
                "n": len(keys),
                "a": _pct(acc_a),
                "b": _pct(acc_b),
                "diff": "-" if diff is None else f"{100 * diff:+.1f}",
                "sign": "" if not diff else ("up" if diff > 0 else "down"),
            }
        )
    plots = [
        bars(
            "Accuracy by category",
            ["overall", *cats],
            {
                name_a: [_acc([fa[k] for k in common])] + [_acc([fa[k] for k in common if fa[k]["category"] == c]) for c in cats],
                name_b: [_acc([fb[k] for k in common])] + [_acc([fb[k] for k in common if fb[k]["category"] == c]) for c in cats],
            },
            percent=True,
            caption=f"{len(common)} questions both runs answered",
        )
    ]
    embed = _Embedder(int(max_image_side), roots=[str(a.resolve()), str(b.resolve())], allow_absolute=allow_absolute)
    flips = {"right -> wrong": [], "wrong -> right": []}
    views = []
    n = 0
    for k in common:
        ca, cb = fa[k]["correct"], fb[k]["correct"]
        if ca is None or cb is None or ca == cb:
            continue
        direction = "right -> wrong" if ca else "wrong -> right"
        n += 1
        entry = {"key": k, "n": n, "category": fa[k]["category"], "render": max_flipped is None or len(flips[direction]) < max_flipped}
        for side, folder, row, name in (("a", a, by_a[k], name_a), ("b", b, by_b[k], name_b)):
            try:
                item = to_item(row, base_dir=folder, index=n)
            except ReportError as e:  # a malformed trajectory: the row's facts, and why
                item = to_item({k: v for k, v in row.items() if k != "trajectory"}, index=n)
                item.error = item.error or e.message
            entry[side] = {"prediction": item.prediction, "anchor": f"{side}-{n}"}
            entry["reference"] = item.ground_truth
            entry["question"] = item.question
            if entry["render"]:
                v = _item_view(n - 1, item, embed)
                v.update(anchor=f"{side}-{n}", run=name, key=k)
                views.append(v)
        flips[direction].append(entry)
    facts = [
        ("run A", f"{name_a}: {a.resolve()}"),
        ("run B", f"{name_b}: {b.resolve()}"),
        ("questions in both", str(len(common))),
        ("only in A / only in B", f"{len(by_a) - len(common)} / {len(by_b) - len(common)}"),
    ]
    if bad_a or bad_b:
        facts.append(("unreadable prediction lines (skipped)", f"{bad_a} / {bad_b}"))
    prov = []
    for side, m in (("A", ma), ("B", mb)):
        p = m.get("provenance") if isinstance(m.get("provenance"), dict) else {}
        prov += [(f"{side} {label}", text) for label, text in provenance_lines(p)[:3]]
    return render_page(
        out_html,
        page="compare",
        title=title or f"{ma.get('benchmark')}: {name_a} vs {name_b}",
        source=source,
        provenance=prov,
        plots=plots,
        facts=facts,
        compare=table,
        names=(name_a, name_b),
        flips=flips,
        views=views,
    )


def _series_from_log(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]] | None:
    xs, ys = [], []
    for e in history:
        x, y = _num(e.get("step")), _num(e.get(key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return (xs, ys) if xs else None


def _per_step(rows: list[dict[str, Any]], fn) -> tuple[list[float], list[float]] | None:
    """Mean of ``fn(row)`` (None skipped) per ``step``."""
    acc: dict[float, list[float]] = {}
    for r in rows:
        s = _num(r.get("step"))
        v = fn(r)
        if s is None or v is None:
            continue
        acc.setdefault(s, []).append(float(v))
    if not acc:
        return None
    xs = sorted(acc)
    return xs, [sum(acc[x]) / len(acc[x]) for x in xs]


def training_plots(history: list[dict[str, Any]], rollouts: list[dict[str, Any]]) -> list[Plot]:
    """The RL page's curves (module docstring); a curve with no data in either source is left out."""

    def reward(part: str):
        return lambda r: _num(r.get("reward", {}).get(part)) if isinstance(r.get("reward"), dict) and r.get("mask_reason") is None else None

    def pick(log_key: str, fn) -> tuple[list[float], list[float]] | None:
        return _series_from_log(history, log_key) or (_per_step(rollouts, fn) if rollouts else None)

    plots = []
    rw = {
        "reward (total)": pick("reward", reward("total")),
        "format": pick("thyme/rewards/format", reward("format")),
        "result": pick("thyme/rewards/result", reward("result")),
        "consistency": pick("thyme/rewards/consistency", reward("consistency")),
    }
    rw = {k: v for k, v in rw.items() if v}
    if rw:
        plots.append(
            lines(
                "Reward and its components",
                rw,
                ylabel="mean per rollout",
                caption="the total reward and its format / result / consistency parts",
            )
        )
    tu = {
        "tool use rate": pick(
            "thyme/tool_use_rate", lambda r: float(any(t.get("execution") for t in _turns(_traj(r)))) if _traj(r) else None
        ),
        "code execution rate": _series_from_log(history, "thyme/code_execution_rate"),
        "crop hit rate": _series_from_log(history, "thyme/crop_hit_rate"),
    }
    tu = {k: v for k, v in tu.items() if v}
    if tu:
        caption = "rollouts that ran code, and code blocks that ran without error"
        if "crop hit rate" in tu:
            caption += "; rollouts whose crop covers at least half of the prompt's target box"
        plots.append(lines("Tool use", tu, ylabel="fraction", caption=caption))
    ro = pick("thyme/rounds", lambda r: float(len(_turns(_traj(r)))) if _traj(r) else None)
    if ro:
        plots.append(lines("Rounds per rollout", {"rounds": ro}, ylabel="mean turns"))
    ln = pick("completions/mean_length", lambda r: _num(r.get("model_tokens")))
    if ln:
        plots.append(
            lines(
                "Response length",
                {"model tokens": ln},
                ylabel="mean tokens per rollout",
                caption="tokens the policy generated (sandbox output excluded)",
            )
        )
    masked: dict[str, tuple[list[float], list[float]]] = {}
    if rollouts:
        counts: dict[str, dict[float, float]] = {}
        steps = set()
        for r in rollouts:
            s = _num(r.get("step"))
            if s is None:
                continue
            steps.add(s)
            if r.get("mask_reason"):
                d = counts.setdefault(str(r["mask_reason"]), {})
                d[s] = d.get(s, 0.0) + 1
        for reason, d in sorted(counts.items()):
            masked[reason] = (sorted(steps), [d.get(s, 0.0) for s in sorted(steps)])
        if not counts and steps:
            masked["masked"] = (sorted(steps), [0.0] * len(steps))
    elif _series_from_log(history, "thyme/masked_rollouts"):
        masked["masked"] = _series_from_log(history, "thyme/masked_rollouts")
    loss = {k: v for k, v in (("loss", _series_from_log(history, "loss")), ("KL", _series_from_log(history, "kl"))) if v}
    if loss:
        plots.append(lines("Loss", loss, caption="the trainer's logged loss (and the KL term when it is computed)"))
    if masked:
        plots.append(
            lines("Masked rollouts per step", masked, ylabel="rollouts", stacked=True, caption="rollouts kept out of the loss, by reason")
        )
    return plots


def write_training(folder: str | os.PathLike, out_html: str | os.PathLike, *, title: str | None = None, source: str | None = None) -> Path:
    """Write the training-curve page of a ``thyme train rl`` output folder (module docstring).

    Raises:
        ReportError: neither ``trainer_state.json`` nor ``rollouts.jsonl`` holds a step.
    """
    from .render import render_page

    folder = Path(folder)
    state_path = trainer_state_path(folder)
    history: list[dict[str, Any]] = []
    if state_path is not None:
        state = _read_json(state_path)
        hist = state.get("log_history") if isinstance(state, dict) else None
        history = [e for e in hist if isinstance(e, dict)] if isinstance(hist, list) else []
    rollouts, bad = _read_jsonl(folder / "rollouts.jsonl") if (folder / "rollouts.jsonl").is_file() else ([], 0)
    plots = training_plots(history, rollouts)
    if not plots:
        raise ReportError(
            f"{folder} holds no training steps to plot (trainer_state.json log_history and rollouts.jsonl are empty)",
            "pass the output_dir of a thyme train rl run that logged at least one step",
        )
    steps = [s for s in (_num(e.get("step")) for e in history) if s is not None]
    facts = [
        ("trainer state", str(state_path) if state_path else "(none)"),
        ("logged steps", str(len(set(steps)))),
        ("rollouts", str(len(rollouts))),
        ("masked rollouts", str(sum(1 for r in rollouts if r.get("mask_reason")))),
    ]
    if bad:
        facts.append(("unreadable rollout lines (skipped)", str(bad)))
    return render_page(
        out_html, page="training", title=title or f"Thyme training: {_run_name(folder)}", source=source, plots=plots, facts=facts
    )
