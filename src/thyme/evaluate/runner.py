"""The ``thyme eval`` loop: benchmark rows through the agent, predictions as they finish, metrics, report.

One run writes into its ``--out`` folder:

- ``predictions.jsonl``: one line per question as its trajectory finishes (``question_id``,
  ``prediction``, ``error``, ``extracted``, ``correct``, ``stop_reason``, ``rounds``,
  ``code_blocks``, ``tool_used``, the whole ``trajectory``...). At the end it is rewritten in
  data order, one line per question.
- ``metrics.json`` (:mod:`thyme.evaluate.metrics`) and ``report.html`` (:mod:`thyme.report`;
  a failing report never costs the predictions or the metrics).
- ``images/`` (images decoded from TSV / parquet data), ``artifacts/`` (sandbox outputs),
  ``run.json`` (settings and backend of the run, read back when a rerun has nothing to do).

Semantics:

- **Resume**: rerunning with the same ``--out`` skips every question that already has a
  prediction without error; questions that failed are run again (``retry_failed``); the last
  line written for a question wins. A line cut by an interruption is dropped.
- **Failures**: a question whose trajectory fails (backend, sandbox, image) is written with its
  ``error`` and scored wrong; it is never dropped.
- **Selection**: ``--replay`` first joins rows to records, then ``--limit N`` keeps the first N
  rows (data order), then ``--num-shards N --shard I`` keeps every N-th row starting at I.
- **Shards** are separate processes (one per GPU) with the same arguments and ``--out``; each
  writes ``predictions.shard-I-of-N.jsonl`` and ``run.shard-I-of-N.json``; the last shard to
  finish merges them into ``predictions.jsonl`` and writes the metrics and the report.
- **Replay** (``--replay RECORDS``): records (Thyme records with ``response``) are joined to
  rows by their ``benchmark`` (any alias) and ``question_id`` fields; rows without a record are
  not evaluated (``replay.rows_without_record`` in the metrics' provenance), records of other
  benchmarks are ignored, and when several records carry the same question the first in the
  file is used (the others are listed as ``duplicate_records``). A record's images are resolved
  against the records file's folder and its own question text is used (what the model saw).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from .. import protocol
from ..agent import Agent, AgentConfig, Task, Trajectory
from ..config import setting
from ..errors import ThymeError
from ..imageio import image_size
from ..jsonl import ensure_writable
from ..scoring.crops import crop_hit, target_box
from .benchmarks import (
    Benchmark,
    MissingImagesError,
    Row,
    check_images,
    find_benchmark,
    get_benchmark,
    load_rows,
    materialise_images,
    row_key,
)
from .metrics import base_provenance, compute_metrics, file_fingerprint


@dataclass
class EvalConfig:
    """Settings of one ``thyme eval`` run (YAML section ``eval``; flags override it). Each
    field's meaning, default and source: ``thyme eval --help``."""

    benchmark: str = setting(
        "", help="vstar, hrbench4k, hrbench8k, mme-realworld, mme-realworld-lite", source="required", show_default="none"
    )
    data: str = setting(
        "",
        help="benchmark file: VLMEvalKit .tsv, official .json/.jsonl/.parquet, or the corpus's normalised .jsonl",
        source="required",
        show_default="none",
    )
    out: str = setting(
        "", help="output folder (predictions.jsonl, metrics.json, report.html); reuse it to resume", source="required", show_default="none"
    )
    images_root: str | None = setting(
        None, help="folder the data's relative image names start from", source="ours", show_default="the data file's folder"
    )
    replay: str | None = setting(
        None, help="Thyme records (JSONL with response, benchmark, question_id) to play back instead of generating", source="ours"
    )
    allow_absolute_paths: bool = setting(
        False,
        help="accept image paths of the data / records that leave their root (absolute, .., symlinks pointing out); only for files you trust (README: Paths in data)",
        source="ours",
    )
    limit: int | None = setting(None, help="evaluate the first N (joined) rows only", source="ours", show_default="all")
    concurrency: int = setting(
        8,
        help="trajectories in flight at once (the batch the agent advances in lockstep rounds; for the hf backend, the generation batch)",
        source="ours",
    )
    num_shards: int = setting(1, help="processes sharing the run (one per GPU); shard I takes rows I, I+N, I+2N...", source="ours")
    shard: int = setting(0, help="this process's shard, 0 <= I < num_shards", source="ours")
    retry_failed: bool = setting(True, help="on resume, run again the questions whose earlier attempt failed", source="ours")
    report: bool = setting(True, help="write report.html at the end", source="ours")
    schedule: Literal["auto", "lockstep", "independent"] = setting(
        "auto",
        help="'lockstep': batches of concurrency trajectories advance round by round (one generate call per round: the hf backend's batching; "
        "a generate call that raises fails its whole batch); 'independent': concurrency worker threads each run one trajectory at a time "
        "(for servers: a failed request fails only its own); 'auto': independent for the openai backend, else lockstep",
        source="ours",
    )


@dataclass
class ReplayRecord:
    """A Thyme record matched to a benchmark row."""

    id: str
    question: str
    response: str
    images: list[str]
    line: int
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResult:
    """What a run produced.

    Attributes:
        out: the output folder.
        metrics: the ``metrics.json`` content, or ``None`` when this shard finished before the others.
        ran: questions run by this invocation.
        skipped: questions already done (resumed).
        predictions_path: the file this invocation appended to.
        report_path: ``report.html`` when written.
        report_error: why the report could not be written, if so.
        failed: this shard's questions whose prediction is an error (run now or kept from an
            earlier run).
    """

    out: Path
    metrics: dict[str, Any] | None
    ran: int
    skipped: int
    predictions_path: Path
    report_path: Path | None = None
    report_error: str | None = None
    failed: int = 0


# --------------------------------------------------------------------------- files


def _shard_suffix(cfg: EvalConfig) -> str:
    return f".shard-{cfg.shard}-of-{cfg.num_shards}" if cfg.num_shards > 1 else ""


def predictions_path(cfg: EvalConfig) -> Path:
    """The file this process appends to."""
    return Path(cfg.out) / f"predictions{_shard_suffix(cfg)}.jsonl"


def read_predictions(path: str | os.PathLike, *, skipped: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{row key: last line written for it}`` from a predictions JSONL.

    The row key is the line's ``key`` field (written by the runner), else its ``question_id``
    (the n-th line with the same id is the id's n-th row). Lines that are not JSON objects with a ``question_id`` (e.g. one cut by an interruption)
    are skipped (``skipped``: a list that gets the message of each line that is not valid JSON,
    too long or too deep, naming the line). A line with an error never replaces an earlier line without one.

    A predictions file is data: the image paths of its trajectories are never opened here; the
    report embeds only files inside the run folder (:func:`thyme.report.write_report` ``roots``).
    """

    out: dict[str, dict[str, Any]] = {}
    p = Path(path)
    if not p.is_file():
        return out
    occurrences: dict[str, int] = {}
    from ..jsonl import iter_lines_bounded, parse_line

    with p.open("rb") as f:
        for n, line in iter_lines_bounded(f):  # bounded: a huge or deep line is skipped too
            try:
                obj = parse_line(line, what=f"line {n} of {p}")
            except ValueError as e:
                if skipped is not None and (line is None or line.strip()):
                    skipped.append(getattr(e, "message", str(e)))
                continue
            if not isinstance(obj, dict) or "question_id" not in obj:
                continue
            if obj.get("key") is not None:
                k = str(obj["key"])
            else:  # a file of our own always has "key"; others: the n-th line of an id is its n-th row
                base = row_key(obj["question_id"])
                occurrences[base] = occurrences.get(base, 0) + 1
                k = row_key(obj["question_id"], occurrences[base])
            if k in out and obj.get("error") and not out[k].get("error"):
                continue
            out[k] = obj
    return out


def read_all_predictions(out: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Predictions of a run folder: ``predictions.jsonl`` and every shard file, merged."""
    base = Path(out)
    merged = read_predictions(base / "predictions.jsonl")
    for f in sorted(base.glob("predictions.shard-*-of-*.jsonl")):
        for k, v in read_predictions(f).items():
            if k in merged and v.get("error") and not merged[k].get("error"):
                continue
            merged[k] = v
    return merged


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- trajectories <-> files


def _map_paths(d: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    d = json.loads(json.dumps(d))
    d["images"] = [fn(p) for p in d.get("images", [])]
    for t in d.get("turns", []):
        for part in t.get("feedback", []) or []:
            if part.get("type") == "image":
                part["image"] = fn(part["image"])
        ex = t.get("execution")
        if ex and ex.get("images"):
            ex["images"] = [fn(p) for p in ex["images"]]
    return d


def _relative_to(out: Path) -> Callable[[str], str]:
    root = out.resolve()

    def fn(p: str) -> str:
        try:
            q = Path(p).resolve()
            return str(q.relative_to(root)) if q.is_relative_to(root) else str(q)
        except (OSError, ValueError):
            return p

    return fn


def absolute_trajectory(d: dict[str, Any], out: str | os.PathLike) -> dict[str, Any]:
    """A saved trajectory dict with its relative image paths made absolute against ``out``."""
    root = Path(out).resolve()
    return _map_paths(d, lambda p: p if os.path.isabs(p) else str(root / p))


# --------------------------------------------------------------------------- replay join


def load_replay_records(
    path: str | os.PathLike, spec: Benchmark, *, allow_absolute: bool = False
) -> tuple[dict[str, ReplayRecord], dict[str, Any]]:
    """Records of ``path`` that belong to ``spec``, keyed by question id; parsed by
    :func:`thyme.records.parse_record` (image paths relative to the records file's folder and
    inside it, unless ``allow_absolute``).

    Returns:
        ``(records, info)``; ``info`` has ``records`` (path), ``lines``, ``of_benchmark``,
        ``without_join_fields``, ``duplicate_records`` (ids of records whose question already
        had a record) and ``refused_records`` (``{"id", "line", "error"}`` of records whose
        image path leaves the records' folder: they are not joined, the others are run).

    Raises:
        ThymeError: the file is missing, a line is not JSON, or a matching record is malformed.
    """
    from ..errors import RecordError
    from ..jsonl import iter_jsonl
    from ..records import PathRefused, parse_record

    p = Path(path)
    if not p.is_file():
        raise ThymeError(
            f"replay records file not found: {p}",
            "pass --replay pointing at a JSONL of Thyme records (image, question, response, benchmark, question_id)",
        )
    base = p.resolve().parent
    out: dict[str, ReplayRecord] = {}
    info: dict[str, Any] = {
        "records": str(p.resolve()),
        "lines": 0,
        "of_benchmark": 0,
        "without_join_fields": 0,
        "duplicate_records": [],
        "refused_records": [],
    }
    for n, obj in iter_jsonl(p):
        info["lines"] += 1
        if isinstance(obj, RecordError):
            raise ThymeError(f"{p}: line {n} is not valid JSON ({getattr(obj, 'reason', obj.message)})", obj.hint)
        if not isinstance(obj, dict) or obj.get("question_id") is None or not obj.get("benchmark"):
            info["without_join_fields"] += 1
            continue
        if find_benchmark(obj["benchmark"]) is not spec:
            continue
        info["of_benchmark"] += 1
        rid = str(obj.get("id") or f"line-{n}")
        if not isinstance(obj.get("response"), str) or not isinstance(obj.get("question"), str):
            raise ThymeError(
                f"{p}: record {rid} (line {n}) lacks 'question' or 'response'",
                "replay records are Thyme records with image, question and response",
            )
        key = row_key(obj["question_id"])
        if key in out:
            info["duplicate_records"].append(rid)
            continue
        try:
            rec = parse_record(obj, line=n, source=p, root=base, allow_absolute=allow_absolute, check_counts=False, check_files=None)
        except PathRefused as e:  # this record is refused; the others run
            info["refused_records"].append({"id": rid, "line": n, "error": str(e)})
            continue
        except RecordError as e:
            raise ThymeError(e.message, e.hint) from None
        out[key] = ReplayRecord(rid, rec.prompt, rec.response, rec.inputs, n, obj)
    return out, info


# --------------------------------------------------------------------------- selection


def select_rows(rows: list[Row], cfg: EvalConfig, records: dict[str, ReplayRecord] | None) -> tuple[list[Row], list[Row]]:
    """``(all selected rows, this shard's rows)``: replay join, then limit, then sharding."""
    sel = [r for r in rows if r.key in records] if records is not None else list(rows)
    if cfg.limit is not None:
        sel = sel[: max(0, cfg.limit)]
    mine = sel[cfg.shard :: cfg.num_shards] if cfg.num_shards > 1 else sel
    return sel, mine


def _check_config(cfg: EvalConfig) -> None:
    if not cfg.out:
        raise ThymeError("no output folder", "pass --out DIR")
    if cfg.num_shards < 1:
        raise ThymeError(f"--num-shards must be at least 1, got {cfg.num_shards}")
    if not 0 <= cfg.shard < cfg.num_shards:
        raise ThymeError(f"--shard must be in [0, {cfg.num_shards}), got {cfg.shard}", "shards are numbered from 0")
    if cfg.concurrency < 1:
        raise ThymeError(f"--concurrency must be at least 1, got {cfg.concurrency}")
    if cfg.limit is not None and cfg.limit < 0:
        raise ThymeError(f"--limit must be >= 0, got {cfg.limit}")
    if cfg.schedule not in ("auto", "lockstep", "independent"):
        raise ThymeError(f"eval schedule must be auto, lockstep or independent, got {cfg.schedule!r}")


# --------------------------------------------------------------------------- the run


def prediction_row(
    spec: Benchmark, row: Row, traj: Trajectory, out: Path, *, shard: int | None = None, record: ReplayRecord | None = None
) -> dict[str, Any]:
    """The ``predictions.jsonl`` line of one finished trajectory."""
    error = traj.error if traj.stop_reason == "error" else None
    score = spec.score(row, traj.answer, error=error)
    d: dict[str, Any] = {
        "question_id": row.question_id,
        "key": row.key,
        "benchmark": spec.name,
        "position": row.position,
        "category": row.category,
        "answer_gt": row.answer,
        "prediction": traj.answer,
        "extracted": score.extracted,
        "correct": score.correct,
        "error": error,
        "stop_reason": traj.stop_reason,
        "rounds": sum(1 for t in traj.turns if t.index >= 0),
        "code_blocks": traj.code_blocks,
        "tool_used": traj.tool_used,
        "question": traj.question,
        "trajectory": _map_paths(traj.to_dict(), _relative_to(out)),
    }
    d.update(target_fields(row, traj))
    if shard is not None:
        d["shard"] = shard
    if record is not None:
        d["record_id"] = record.id
        d["prompt_matches_record"] = spec.question(row) == record.question
    return d


def target_fields(row: Row, traj: Trajectory) -> dict[str, Any]:
    """The crop-hit fields of a prediction row whose benchmark row carries a target box.

    A row's ``bbox`` field (JSONL, JSON, parquet, or a TSV column; read by
    :func:`thyme.scoring.crops.target_box`: ``[x1, y1, x2, y2]`` in pixels of the original
    input image) gives ``target_box``, ``image_size`` (``[W, H]`` of the input image, read
    from its header) and ``crop_hit`` (:meth:`thyme.scoring.crops.CropHit.to_dict`: the
    crops of the input image the code made, the best share of the target they cover, and
    ``hit`` = that share >= 0.5). Rows without a box (or with a malformed one) get none of
    these; an unreadable image gives ``crop_hit: null``. Never raises.
    """
    box = target_box(row.extra.get("bbox")) if isinstance(row.extra, dict) else None
    if box is None:
        return {}
    size = None
    path = row.image or (traj.images[0] if traj.images else None)
    if path:
        try:
            size = image_size(path)
        except (ThymeError, OSError):
            size = None
    return {
        "target_box": list(box),
        "image_size": list(size) if size else None,
        "crop_hit": crop_hit(traj, box, size).to_dict() if size else None,
    }


def _failed_trajectory(key: str, question: str, images: list[str], error: BaseException) -> Trajectory:
    msg = str(error) if isinstance(error, ThymeError) else f"{type(error).__name__}: {error}"
    return Trajectory(id=key, question=question, images=images, stop_reason="error", error=msg)


#: Settings whose change changes the predictions; a resumed run must match them (``prediction_settings``).
PREDICTION_MODEL_KEYS = ("revision", "min_pixels", "max_pixels")


def prediction_settings(cfg: EvalConfig, agent_cfg: Any, settings: dict[str, Any] | None) -> dict[str, Any]:
    """What decides the predictions of a run, compared when a rerun resumes into the same ``--out``.

    The backend and model (and revision), the pixel budget, and every agent setting (decoding,
    rounds, token caps, prompt options such as ``on_error``, ``shown_path``, ``prefill``). The
    model identity comes from ``settings`` (``backend``, ``model``, ``model_flags``: the cli
    passes them) so the check runs before a model is loaded.
    """
    st = settings or {}
    flags = st.get("model_flags") or {}
    agent = dataclasses.asdict(agent_cfg) if dataclasses.is_dataclass(agent_cfg) else dict(agent_cfg or {})
    return {
        "backend": "replay" if cfg.replay else st.get("backend"),
        "model": st.get("model"),
        "replay": cfg.replay and str(Path(cfg.replay).resolve()),
        **{k: flags.get(k) for k in PREDICTION_MODEL_KEYS},
        "agent": agent,
    }


def _settings_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _settings_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} before, {b!r} now")
    return out


def _check_resume(out: Path, prev: dict[str, Any] | None, new: dict[str, Any]) -> None:
    """Refuse to mix predictions made with other settings into ``out``.

    Raises:
        ThymeError: naming every setting that differs.
    """
    old = (prev or {}).get("prediction_settings")
    if old is None:
        return
    diff = _settings_diff(old, json.loads(json.dumps(new, default=str)))
    if diff:
        raise ThymeError(
            f"{out} holds predictions made with other settings; resuming would mix them: " + "; ".join(diff),
            "rerun with the settings of that run, pass a new --out, or --overwrite to start afresh in this folder",
        )


def _clear_run(out: Path) -> None:
    """Remove a run's predictions, run info, metrics and report (``--overwrite``)."""
    for pat in ("predictions.jsonl", "predictions.shard-*-of-*.jsonl", "run.json", "run.shard-*-of-*.json", "metrics.json", "report.html"):
        for f in out.glob(pat):
            f.unlink()


def run_eval(
    cfg: EvalConfig,
    *,
    agent_config: AgentConfig | None = None,
    sandbox_config: Any = None,
    backend_factory: Callable[[], Any] | None = None,
    judge: Any = None,
    settings: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    report_writer: Callable[..., Any] | None = None,
    overwrite: bool = False,
    precheck: Callable[[list[Row]], None] | None = None,
    on_backend: Callable[[Any, list[Row]], None] | None = None,
) -> EvalResult:
    """Run (or resume) an evaluation; see the module docstring. Prepare (rows, replay join,
    resume state, images, sandbox, backend) -> schedule (:func:`thyme.agent.scheduler.schedule`)
    -> finalise (merge shards, metrics, report).

    Args:
        cfg: what to run and where to write.
        agent_config: loop settings (default: :class:`thyme.agent.AgentConfig`, the reference's
            evaluation: greedy, 5 rounds of 2048 tokens); replay raises ``max_rounds`` to fit
            every recorded segment.
        sandbox_config: a :class:`thyme.sandbox.SandboxConfig` (default settings when ``None``).
        backend_factory: builds the backend when there is something to generate (not used with
            ``cfg.replay``); called at most once.
        judge: a :class:`thyme.scoring.judge.JudgeClient` for unparsed answers (``None``: off).
        settings: extra provenance (e.g. the model flags) stored in ``metrics.json``.
        log: where progress lines go (default: standard error).
        report_writer: ``write_report(items, path, title=...)`` (the cli passes
            :func:`thyme.report.write_report`; evaluation sits below the report and never
            imports it); ``None`` writes no ``report.html``.
        overwrite: start afresh: remove the folder's predictions, run info, metrics and report
            first (otherwise a rerun whose :func:`prediction_settings` differ from the earlier
            run's is refused).
        precheck: called with the rows to run after their images are checked, before the
            backend is built (e.g. the sandbox layers); raises to stop.
        on_backend: called with the built backend and the rows to run, before generating
            (e.g. the prompt-length check); raises to stop.

    Returns:
        :class:`EvalResult`.

    Raises:
        ThymeError: bad arguments, unreadable data, missing images (all listed), unknown benchmark.
        KeyboardInterrupt: Ctrl-C; the predictions written so far are kept (a rerun resumes).
    """
    from ..sandbox import SandboxConfig

    log = log or (lambda s: print(s, file=sys.stderr))
    _check_config(cfg)
    spec = get_benchmark(cfg.benchmark)
    out = ensure_writable(cfg.out, what="--out", folder=True)
    if overwrite:
        _clear_run(out)
    rows = load_rows(spec, cfg.data, images_root=cfg.images_root, allow_absolute=cfg.allow_absolute_paths)
    records, join_info = _join_replay(cfg, spec, rows) if cfg.replay else (None, None)
    selected, mine = select_rows(rows, cfg, records)
    agent_cfg = agent_config or AgentConfig()
    sandbox_cfg = sandbox_config or SandboxConfig()
    pred_settings = prediction_settings(cfg, agent_cfg, settings)

    run_info_path = out / f"run{_shard_suffix(cfg)}.json"
    prev_info = _read_json(run_info_path)
    done = _resume_state(cfg, out, prev_info, pred_settings)
    todo = [r for r in mine if r.key not in done]
    skipped = len(mine) - len(todo)
    failed = sum(1 for r in mine if done.get(r.key, {}).get("error"))
    backend_desc: dict[str, Any] = (prev_info or {}).get("backend") or {}

    if todo:
        _check_inputs(cfg, todo, records, out)
        if precheck is not None:
            precheck(todo)
        # the sandbox before the backend: layers its config requires but this host lacks stop
        # the run before a model is loaded (ConfinementError names them)
        with contextlib.ExitStack() as stack:
            sandbox, backend, backend_desc, agent_cfg = _open(
                stack, cfg, sandbox_cfg, agent_cfg, backend_factory, records, todo, log=log, on_backend=on_backend
            )
            _check_same_backend(out, prev_info, backend_desc, skipped)
            _write_run_info(
                run_info_path,
                cfg,
                backend_desc,
                agent_cfg,
                sandbox_cfg,
                settings,
                complete=False,
                selected=len(mine),
                done=skipped,
                prediction=pred_settings,
            )
            agent = stack.enter_context(Agent(backend, sandbox, agent_cfg, artifacts_dir=out / "artifacts"))
            failed += _schedule(cfg, spec, agent, backend, mine, records, done, out, skipped)
    else:
        log(
            f"nothing to run: all {len(mine)} question(s) of this {'shard' if cfg.num_shards > 1 else 'run'} already have predictions in {out}"
        )

    result = EvalResult(out, None, len(todo), skipped, predictions_path(cfg), failed=failed)
    with _run_lock(out):  # marking this shard complete and checking the others is one step
        _write_run_info(
            run_info_path,
            cfg,
            backend_desc,
            agent_cfg,
            sandbox_cfg,
            settings,
            complete=True,
            selected=len(mine),
            done=len(mine),
            prediction=pred_settings,
        )
        if cfg.num_shards > 1 and not _all_shards_complete(out, cfg):
            log(f"shard {cfg.shard} of {cfg.num_shards} done; the last shard to finish merges the predictions and writes metrics.json")
            return result
        return finalise(
            cfg, spec, rows, selected, judge=judge, join_info=join_info, result=result, log=log, report_writer=report_writer, _locked=True
        )


# --------------------------------------------------------------------------- run_eval's steps


def _resume_state(cfg: EvalConfig, out: Path, prev_info: dict[str, Any] | None, pred_settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The predictions ``out`` already has that this run keeps (failed ones are run again with
    ``retry_failed``), by row key.

    Raises:
        ThymeError: they were made with other settings (:func:`_check_resume`).
    """
    done = read_all_predictions(out)
    if done:
        _check_resume(out, prev_info or _any_run_info(out), pred_settings)
    if cfg.retry_failed:
        done = {k: v for k, v in done.items() if not v.get("error")}
    return done


def _join_replay(cfg: EvalConfig, spec: Benchmark, rows: list[Row]) -> tuple[dict[str, ReplayRecord], dict[str, Any]]:
    """The replay records of ``cfg.replay`` joined to ``rows``, and the join's provenance.

    Raises:
        ThymeError: no record matches a row.
    """
    records, join_info = load_replay_records(cfg.replay, spec, allow_absolute=cfg.allow_absolute_paths)
    keys = {r.key for r in rows}
    join_info["matched"] = sum(1 for r in rows if r.key in records)
    join_info["rows_without_record"] = len(rows) - join_info["matched"]
    join_info["records_without_row"] = sorted(records[k].id for k in records if k not in keys)
    if join_info["matched"] == 0:
        raise ThymeError(
            f"no record of {cfg.replay} matches a row of {cfg.data} (benchmark {spec.name}: {join_info['of_benchmark']} record(s) of this benchmark)",
            "records join rows by their 'benchmark' and 'question_id' fields",
        )
    return records, join_info


def _check_inputs(cfg: EvalConfig, todo: list[Row], records: dict[str, ReplayRecord] | None, out: Path) -> None:
    """Every image of the rows to run is there (all missing ones listed): before any model loads.

    Raises:
        MissingImagesError: naming the images that are not there.
    """
    if records is not None:
        for r in todo:
            rec = records[r.key]
            r.image = rec.images[0] if rec.images else None
            raw = rec.raw.get("image")
            r.image_name = (raw[0] if raw else None) if isinstance(raw, list) else raw
        try:
            check_images(todo, images_root=Path(cfg.replay).resolve().parent, data=cfg.replay)
        except MissingImagesError as e:
            raise MissingImagesError(
                e.message.replace("relative names resolved against", "record images resolved against"),
                "replay records' image paths are relative to the records file's folder",
            ) from None
    else:
        materialise_images(todo, cfg.data, out / "images")
        check_images(todo, images_root=cfg.images_root, data=cfg.data)


def _open(
    stack: contextlib.ExitStack,
    cfg: EvalConfig,
    sandbox_cfg: Any,
    agent_cfg: AgentConfig,
    backend_factory: Callable[[], Any] | None,
    records: dict[str, ReplayRecord] | None,
    todo: list[Row],
    *,
    log: Callable[[str], None],
    on_backend: Callable[[Any, list[Row]], None] | None,
) -> tuple[Any, Any, dict[str, Any], AgentConfig]:
    """The sandbox, then the backend (replay: the records' responses, built by the registry), entered on ``stack``;
    returns ``(sandbox, backend, its description, the agent config to run with)``."""
    from ..rollout.registry import build_backend
    from ..sandbox import Sandbox

    sandbox = stack.enter_context(Sandbox(sandbox_cfg))
    if records is not None:
        backend = stack.enter_context(build_backend("replay", {r.key: records[r.key].response for r in todo}))
        rounds = max(len(protocol.split_recorded_response(records[r.key].response)) for r in todo)
        agent_cfg = dataclasses.replace(agent_cfg, max_rounds=max(agent_cfg.max_rounds, rounds))
        return sandbox, backend, {"backend": "replay", "records": str(Path(cfg.replay).resolve())}, agent_cfg
    if backend_factory is None:
        raise ThymeError("no backend to generate with", "pass --model ID, --base-url URL --model NAME, or --replay RECORDS")
    log(f"loading backend for {len(todo)} question(s) ...")
    backend = backend_factory()
    stack.enter_context(backend)
    check_server = getattr(backend, "check_server", None)
    if callable(check_server):  # a server backend: down, mistyped URL, wrong model name stop here, once
        if agent_cfg.ats and agent_cfg.temperature > 0 and getattr(backend.capabilities, "ats", False):
            check_server(ats=True)  # and that the server applies ATS (openai: thyme's vLLM logits processor)
        else:
            check_server()
    try:
        desc = backend.describe()
    except Exception as e:  # provenance must not stop a run
        desc = {"backend": getattr(backend, "name", type(backend).__name__), "describe_error": str(e)}
    if on_backend is not None:
        on_backend(backend, todo)
    return sandbox, backend, desc, agent_cfg


def _check_same_backend(out: Path, prev_info: dict[str, Any] | None, backend_desc: dict[str, Any], skipped: int) -> None:
    """Refuse to resume predictions of another backend, model or revision into ``out``."""
    prev_backend = (prev_info or {}).get("backend") or {}
    ident = ("backend", "model", "revision")
    if skipped and prev_backend and tuple(prev_backend.get(k) for k in ident) != tuple(backend_desc.get(k) for k in ident):
        raise ThymeError(
            f"{out} holds predictions of {prev_backend.get('backend')} {prev_backend.get('model')!r} (revision {prev_backend.get('revision')!r}); "
            f"this run's backend is {backend_desc.get('backend')} {backend_desc.get('model')!r} (revision {backend_desc.get('revision')!r}): resuming would mix them",
            "pass a new --out, or --overwrite to start afresh in this folder",
        )


def _schedule(
    cfg: EvalConfig,
    spec: Benchmark,
    agent: Agent,
    backend: Any,
    mine: list[Row],
    records: dict[str, ReplayRecord] | None,
    done: dict[str, dict[str, Any]],
    out: Path,
    skipped: int,
) -> int:
    """Run this shard's rows that are not ``done`` through the agent; returns how many failed.

    Lockstep (batches of ``concurrency`` rows, one generate call per round) or independent
    (``concurrency`` workers, one row each): ``cfg.schedule``, ``auto`` following the backend's
    ``capabilities.independent_requests``.
    """
    from ..agent.scheduler import Progress, schedule

    caps = getattr(backend, "capabilities", None)
    independent = cfg.schedule == "independent" or (cfg.schedule == "auto" and bool(caps and caps.independent_requests))
    workers, batch_size = (cfg.concurrency, 1) if independent else (1, cfg.concurrency)
    tally = {"correct": sum(1 for r in mine if done.get(r.key, {}).get("correct")), "finished": skipped}

    def work(batch: list[Row]) -> list[Trajectory]:
        tasks = []
        for r in batch:
            question = records[r.key].question if records is not None else spec.question(r)
            tasks.append(
                Task(question, [r.image] if r.image else [], id=r.key, meta={"benchmark": spec.name, "question_id": r.question_id})
            )
        return agent.run_batch(tasks)

    def on_error(batch: list[Row], e: Exception) -> list[Trajectory]:  # the agent records failures itself; a last resort
        return [
            _failed_trajectory(r.key, records[r.key].question if records is not None else spec.question(r), [r.image] if r.image else [], e)
            for r in batch
        ]

    def line(r: Row, traj: Trajectory) -> dict[str, Any]:
        return prediction_row(
            spec, r, traj, out, shard=cfg.shard if cfg.num_shards > 1 else None, record=records[r.key] if records is not None else None
        )

    def on_record(r: Row, line: dict[str, Any]) -> None:
        tally["correct"] += int(bool(line["correct"]))
        tally["finished"] += 1
        acc = tally["correct"] / max(1, tally["finished"])
        progress.set_status(f"acc {acc:.3f}", acc=f"{acc:.3f}")

    progress = Progress(len(mine), initial=skipped, desc=f"eval {spec.name}", unit="q")
    res = schedule(
        mine,
        work,
        out=predictions_path(cfg),
        key=lambda r: r.key,
        record=line,
        workers=workers,
        batch_size=batch_size,
        done=done,
        on_error=on_error,
        on_record=on_record,
        progress=progress,
        label="question",
    )
    return res.failed


@contextlib.contextmanager
def _run_lock(out: Path):
    """An exclusive lock on the run folder (shards finishing at the same time merge once)."""
    import fcntl

    with open(out / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_json(path: Path) -> dict[str, Any] | None:
    from ..jsonl import loads_bounded

    try:
        return loads_bounded(path.read_bytes(), what=str(path))
    except (OSError, ValueError):
        return None


def _config_signature(cfg: EvalConfig) -> dict[str, Any]:
    return {
        "benchmark": cfg.benchmark,
        "data": str(Path(cfg.data).resolve()),
        "replay": cfg.replay and str(Path(cfg.replay).resolve()),
        "limit": cfg.limit,
        "num_shards": cfg.num_shards,
    }


def _any_run_info(out: Path) -> dict[str, Any] | None:
    """The run info of any shard (or the single run) of ``out`` that records prediction settings."""
    for f in sorted(out.glob("run*.json")):
        info = _read_json(f)
        if info and info.get("prediction_settings") is not None:
            return info
    return None


def _write_run_info(
    path: Path,
    cfg: EvalConfig,
    backend: dict[str, Any],
    agent_cfg: Any,
    sandbox_cfg: Any,
    settings: dict[str, Any] | None,
    *,
    complete: bool,
    selected: int,
    done: int,
    prediction: dict[str, Any] | None = None,
) -> None:
    info = {
        "signature": _config_signature(cfg),
        "prediction_settings": prediction,
        "shard": cfg.shard,
        "num_shards": cfg.num_shards,
        "complete": complete,
        "selected": selected,
        "done": done,
        "backend": backend,
        "eval": dataclasses.asdict(cfg),
        "agent": dataclasses.asdict(agent_cfg) if dataclasses.is_dataclass(agent_cfg) else agent_cfg,
        "sandbox": dataclasses.asdict(sandbox_cfg) if dataclasses.is_dataclass(sandbox_cfg) else sandbox_cfg,
        "settings": settings or {},
    }
    _atomic_write(path, json.dumps(info, ensure_ascii=False, indent=1, default=str) + "\n")


def _all_shards_complete(out: Path, cfg: EvalConfig) -> bool:
    sig = _config_signature(cfg)
    for i in range(cfg.num_shards):
        info = _read_json(out / f"run.shard-{i}-of-{cfg.num_shards}.json")
        if not info or not info.get("complete"):
            return False
        if info.get("signature") != sig:
            raise ThymeError(
                f"shard {i} of {out} was run with different arguments ({info.get('signature')}) than this shard ({sig})",
                "every shard needs the same --benchmark, --data, --replay, --limit and --num-shards",
            )
    return True


def finalise(
    cfg: EvalConfig,
    spec: Benchmark,
    rows: list[Row],
    selected: list[Row],
    *,
    judge: Any = None,
    join_info: dict[str, Any] | None = None,
    result: EvalResult | None = None,
    log: Callable[[str], None] | None = None,
    report_writer: Callable[..., Any] | None = None,
    _locked: bool = False,
) -> EvalResult:
    """Merge the run folder's predictions, write ``predictions.jsonl`` (data order),
    ``metrics.json`` over the selected rows, then ``report.html``."""
    log = log or (lambda s: print(s, file=sys.stderr))
    out = Path(cfg.out)
    result = result or EvalResult(out, None, 0, 0, predictions_path(cfg))
    with contextlib.nullcontext() if _locked else _run_lock(out):
        merged = read_all_predictions(out)
        position = {r.key: r.position for r in rows}
        ordered = [merged[k] for k in sorted(merged, key=lambda k: (position.get(k, 1 << 60), k))]
        _atomic_write(out / "predictions.jsonl", "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in ordered))
        keys = {r.key for r in selected}
        preds = {k: v for k, v in merged.items() if k in keys}
        metrics = compute_metrics(spec, selected, preds, judge=judge, provenance=_provenance(cfg, out, judge, join_info))
        _atomic_write(out / "metrics.json", json.dumps(metrics, ensure_ascii=False, indent=1) + "\n")
    result.metrics = metrics
    log(
        f"{spec.title}: overall {metrics['overall']:.4f} over {metrics['counts']['rows']} question(s); metrics written to {out / 'metrics.json'}"
    )
    if cfg.report and report_writer is not None:
        try:
            items = []
            for r in selected:
                p = preds.get(r.key)
                if p is None:
                    continue
                traj = (
                    p.get("trajectory")
                    or _failed_trajectory(
                        r.key, p.get("question") or spec.question(r), [], RuntimeError(p.get("error") or "no trajectory")
                    ).to_dict()
                )
                items.append(
                    {
                        "id": r.key,
                        "trajectory": absolute_trajectory(traj, out),
                        "correct": p.get("correct"),
                        "category": r.category,
                        "benchmark": spec.name,
                        "answer_gt": r.answer,
                        "prediction": p.get("prediction"),
                    }
                )
            path = out / "report.html"
            report_writer(
                items, path, title=f"{spec.title}: {metrics['overall']:.1%} ({metrics['counts']['correct']}/{metrics['counts']['rows']})"
            )
            result.report_path = path
        except Exception as e:  # the report is a view: predictions and metrics are already safe
            result.report_error = f"{type(e).__name__}: {e}"
            log(f"warning: report.html not written ({result.report_error}); predictions.jsonl and metrics.json are complete")
    return result


def _provenance(cfg: EvalConfig, out: Path, judge: Any, join_info: dict[str, Any] | None) -> dict[str, Any]:
    infos = []
    if cfg.num_shards > 1:
        infos = [_read_json(out / f"run.shard-{i}-of-{cfg.num_shards}.json") or {} for i in range(cfg.num_shards)]
    else:
        infos = [_read_json(out / "run.json") or {}]
    first = infos[0] if infos else {}
    backend = first.get("backend") or {}
    agent = first.get("agent") or {}
    prov: dict[str, Any] = {
        "model": backend.get("model"),
        "revision": backend.get("revision"),
        "model_commit": backend.get("commit"),
        "backend": backend.get("backend"),
        "backend_details": backend,
        "settings": {
            "eval": first.get("eval"),
            "agent": agent,
            "sandbox": first.get("sandbox"),
            "pixel_budget": {"min_pixels": backend.get("min_pixels"), "max_pixels": backend.get("max_pixels")},
            "decoding": {
                k: agent.get(k)
                for k in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "max_rounds", "max_total_tokens", "seed")
            },
            **(first.get("settings") or {}),
        },
        "data": file_fingerprint(cfg.data),
        "judge": judge.describe() if judge is not None else None,
    }
    if join_info is not None:
        prov["replay"] = join_info
    if cfg.num_shards > 1:
        prov["shards"] = [
            {"shard": i.get("shard"), "backend": (i.get("backend") or {}).get("device"), "selected": i.get("selected")} for i in infos
        ]
    prov.update(base_provenance())
    return prov


def rescore(
    benchmark: str,
    data: str | os.PathLike,
    predictions: str | os.PathLike,
    *,
    judge: Any = None,
) -> dict[str, Any]:
    """Score saved predictions (``thyme eval score``): no generation, no images.

    Args:
        benchmark: benchmark name.
        data: the benchmark data file (answers, options, categories).
        predictions: a JSONL of rows with ``question_id`` and ``prediction`` (``error``,
            ``tool_used``, ``rounds`` used when present).
        judge: optional judge for unparsed answers.

    Returns:
        The ``metrics.json`` dict over the data rows that have a prediction.

    Raises:
        ThymeError: the predictions file is missing, or none of its rows matches the data.
    """
    spec = get_benchmark(benchmark)
    p = Path(predictions)
    if not p.is_file():
        raise ThymeError(f"predictions file not found: {p}", "pass --predictions pointing at a predictions.jsonl")
    rows = load_rows(spec, data)
    skipped: list[str] = []
    preds = read_predictions(p, skipped=skipped)
    for msg in skipped:  # a bad line is named; the other lines are scored
        print(f"warning: {msg}; skipped", file=sys.stderr)
    if not preds:
        raise ThymeError(f"{p} has no prediction rows", "each line needs 'question_id' and 'prediction'")
    keys = {r.key for r in rows}
    if not any(k in keys for k in preds):
        sample = ", ".join(list(preds)[:5])
        raise ThymeError(
            f"no prediction of {p} matches a question of {data} (prediction ids: {sample}...)",
            f"is --benchmark {spec.name} with this --data the run's benchmark?",
        )
    prov = {
        "predictions": str(p.resolve()),
        "data": file_fingerprint(data),
        "judge": judge.describe() if judge is not None else None,
        "rescored": True,
    }
    prov.update(base_provenance())
    return compute_metrics(spec, rows, preds, judge=judge, provenance=prov)


def format_metrics(m: dict[str, Any]) -> str:
    """A short human-readable summary of a metrics dict."""
    c = m["counts"]
    lines = [f"benchmark: {m.get('benchmark')}", f"overall: {m['overall']:.4f} ({c['correct']}/{c['rows']})"]
    for cat, v in m.get("per_category", {}).items():
        lines.append(f"  {cat}: {v['accuracy']:.4f} ({v['correct']}/{v['total']})" if v["accuracy"] is not None else f"  {cat}: -")
    if "hrbench" in m:
        a = m["hrbench"]["average"]
        lines.append(
            "HR-Bench, mean over {} cycle(s): all {} FSP {} FCP {}".format(
                m["hrbench"]["num_cycles"], *(f"{a[k]:.4f}" if a[k] is not None else "-" for k in ("all", "FSP", "FCP"))
            )
        )
    if "mme_realworld" in m:
        for task, v in m["mme_realworld"].items():
            if isinstance(v, dict):
                lines.append(f"MME-RealWorld {task}: {v['Avg']:.4f} ({v['count']} questions)")
    extra = [f"{k} {c[k]}" for k in ("failed", "unparsed", "judged", "judge_invalid", "missing", "unknown") if c.get(k)]
    if extra:
        lines.append("counts: " + ", ".join(extra))
    if m.get("tool_use_rate") is not None:
        lines.append(f"tool use rate: {m['tool_use_rate']:.4f}; mean rounds: {m['mean_rounds']}")
    if "crop_hit_rate" in m:
        ch, code = m["crop_hit"], m.get("crop_hit_rate_code")
        lines.append(
            f"crop hit rate: {m['crop_hit_rate']:.4f} ({ch['hits']}/{ch['rows_with_box']} rows with a target box)"
            + (f"; over those that used code: {code:.4f} ({ch['hits']}/{ch['rows_with_box_and_code']})" if code is not None else "")
        )
    return "\n".join(lines)
