"""Re-executing recorded Thyme trajectories (``thyme replay``).

Every record's code blocks run again in the sandbox, in order, in one session per record,
through the same agent loop the models use (backend ``replay``). Per record we report
whether each block executed, whether the final answer matches the recorded one, and, for
records carrying ``reference_outputs`` (the corpus format), whether each block's outputs
match the reference sandbox's: the same image sizes, or the same printed text.

Record format (Thyme SFT records, one JSON object per line):
``image`` (list: input image first, then recorded sandbox outputs; relative paths start
from the records file's folder or ``--images-root`` and must stay inside it unless
``--allow-absolute-paths``: :mod:`thyme.records`; may be empty for text-only questions), ``question``
(leading ``<image>`` placeholder allowed), ``response``; optional ``id``,
``model_answer``, ``reference_outputs`` (per code block, a list of ``{"image", "size":
[w, h]}`` or ``{"text"}``), ``benchmark``, ``question_id``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import protocol
from ..backends.replay import ReplayBackend
from ..config import setting
from ..errors import RecordError
from ..jsonl import ResumableJsonl
from ..records import Record as _Record
from ..records import iter_records as _iter
from ..records import parse_record as _parse
from .loop import Agent, AgentConfig, Task
from .parallel import imap_ordered, import_ray, progress_interval_setting, ray_imap_ordered, ray_setting, resolve_workers, workers_setting
from .trajectory import Trajectory

#: A parsed Thyme record (:class:`thyme.records.Record`; its ``prompt`` is what the model is
#: asked, its ``inputs`` the input images).
Record = _Record


def parse_record(obj: Any, *, line: int, images_root: str | os.PathLike | None, allow_absolute: bool = False) -> Record:
    """Validate one record for replay (:func:`thyme.records.parse_record`: inputs must exist;
    image counts are not checked; every path inside ``images_root`` unless ``allow_absolute``).

    Raises:
        RecordError: naming the line and the field that is wrong (PathRefused: a path outside the root).
    """
    return _parse(obj, line=line, root=images_root, allow_absolute=allow_absolute, check_counts=False, check_files="inputs")


def iter_records(
    path: str | os.PathLike, *, images_root: str | os.PathLike | None, allow_absolute: bool = False
) -> Iterator[tuple[int, Record | RecordError]]:
    """Yield ``(line_number, Record or RecordError)`` for each non-empty line of ``path``
    (relative paths start from ``images_root``, default the records file's folder).

    Raises:
        RecordError: when ``path`` itself cannot be read.
    """
    return _iter(path, root=images_root, allow_absolute=allow_absolute, check_counts=False, check_files="inputs")


def require_json_objects(path: str | os.PathLike, *, what: str = "records") -> None:
    """Refuse a file none of whose lines is a JSON object (an image, an HTML report, a CSV
    passed by mistake) with one clear error, instead of one failure per line of text (as
    ``thyme report`` does). Lines are read until the first object (bounded:
    :func:`thyme.jsonl.iter_jsonl`); an empty file passes (its callers say it holds nothing).

    Raises:
        ThymeError: naming the file and why its first line is not a record; RecordError: the
            file cannot be read.
    """
    from ..errors import ThymeError
    from ..jsonl import iter_jsonl

    first: str | None = None
    for n, obj in iter_jsonl(path):
        if isinstance(obj, dict):
            return
        if first is None:
            reason = getattr(obj, "reason", None) or getattr(obj, "message", None) or f"a JSON {type(obj).__name__}, not an object"
            first = f"line {n}: {reason}"
    if first is not None:
        raise ThymeError(
            f"{path} is not a JSONL file of {what}: no line is a JSON object ({first})",
            "pass a JSONL file of Thyme records (image, question, response), one JSON object per line",
        )


def _outputs_match(reference: list[dict[str, Any]], execution: dict[str, Any] | None) -> bool:
    """Whether one code block's outputs match the reference sandbox's (sizes or text)."""
    if execution is None or not execution.get("ok"):
        return False
    # a null field is an absent one (a parquet source unifies the entries' structs)
    ref_images = [r for r in reference if isinstance(r, dict) and r.get("size") is not None]
    ref_texts = [r["text"] for r in reference if isinstance(r, dict) and r.get("text") is not None]
    if ref_images:
        from ..imageio import image_size

        sizes = []
        for p in execution.get("images", []):
            sizes.append(list(image_size(p)))  # header only, budgets checked
        return sizes == [list(r["size"]) for r in ref_images]
    if ref_texts:
        return execution.get("stdout", "").strip() == "\n".join(t.strip() for t in ref_texts)
    return not execution.get("images") and not execution.get("stdout", "").strip()


def _sizes(paths: list[str]) -> list[list[int] | None]:
    from ..imageio import image_size

    out: list[list[int] | None] = []
    for p in paths:
        try:
            out.append(list(image_size(p)))
        except Exception:  # unreadable: reported as unknown
            out.append(None)
    return out


def score_replay(record: Record, traj: Trajectory) -> dict[str, Any]:
    """The per-record result line of ``thyme replay``."""
    executed = [t for t in traj.turns if t.code is not None]
    executed_ok = sum(1 for t in executed if t.execution and t.execution.get("ok"))
    recorded = record.raw.get("model_answer")
    if recorded is None:
        recorded = protocol.extract_answer(record.response)
    out: dict[str, Any] = {
        "id": record.id,
        "ok": traj.stop_reason != "error",
        "error": traj.error,
        "stop_reason": traj.stop_reason,
        "code_blocks": len(executed),
        "executed_ok": executed_ok,
        "answer": traj.answer,
        "recorded_answer": recorded,
        "answer_match": traj.answer is not None and recorded is not None and traj.answer.strip() == str(recorded).strip(),
        # the whole assistant message regenerated byte for byte (images as <image>)
        "response_match": traj.response_text() == record.response,
        "fixes": [[f.get("name") for f in (t.execution or {}).get("fixes", [])] for t in executed],
        # [w, h] of each block's produced images, read where they were made (a worker may keep
        # them in a temporary folder, or on another machine)
        "image_sizes": [_sizes((t.execution or {}).get("images") or []) for t in executed],
    }
    refs = record.raw.get("reference_outputs")
    if isinstance(refs, list):
        matches = [_outputs_match(refs[i] if i < len(refs) else [], t.execution) for i, t in enumerate(executed)]
        out["outputs_match"] = sum(matches)
        out["outputs_checked"] = len(matches)
    for key in ("benchmark", "question_id"):
        if key in record.raw:
            out[key] = record.raw[key]
    out["trajectory"] = traj.to_dict()
    return out


@dataclass
class ReplaySummary:
    """Totals of a replay run (the ``--json`` line)."""

    trajectories: int = 0
    failed: int = 0
    code_blocks: int = 0
    executed_ok: int = 0
    answers_match: int = 0
    outputs_match: int | None = None
    resumed: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)

    def add(self, row: dict[str, Any]) -> None:
        self.trajectories += 1
        if not row.get("ok"):
            self.failed += 1
            self.failures.append({"id": row.get("id"), "line": row.get("line"), "error": row.get("error")})
        self.code_blocks += row.get("code_blocks", 0)
        self.executed_ok += row.get("executed_ok", 0)
        self.answers_match += int(bool(row.get("answer_match")))
        if "outputs_match" in row:
            self.outputs_match = (self.outputs_match or 0) + row["outputs_match"]

    def to_dict(self) -> dict[str, Any]:
        d = {
            "trajectories": self.trajectories,
            "code_blocks": self.code_blocks,
            "executed_ok": self.executed_ok,
            "answers_match": self.answers_match,
        }
        if self.outputs_match is not None:
            d["outputs_match"] = self.outputs_match
        d["failed"] = self.failed
        if self.failures:
            d["failures"] = self.failures
        return d


@dataclass
class ReplayConfig:
    """How ``thyme replay`` spreads its work; each field's meaning, default and source:
    ``thyme replay --help``."""

    batch_size: int = setting(
        8, help="records replayed together in one worker (their code runs concurrently in its sandbox pool)", source="ours"
    )
    workers: int | None = workers_setting()
    ray: str | None = ray_setting()
    progress_interval_s: float = progress_interval_setting()


@dataclass
class _WorkerSetup:
    """What a worker process needs to replay batches (pickled to it once)."""

    sandbox_config: Any
    agent_config: AgentConfig
    artifacts_dir: str | None


def _worker_setup(arg: _WorkerSetup) -> tuple[Any, _WorkerSetup]:
    from ..sandbox import Sandbox

    return Sandbox(arg.sandbox_config), arg


def _worker_teardown(state: tuple[Any, _WorkerSetup]) -> None:
    state[0].close()


def _error_row(n: int, message: str) -> dict[str, Any]:
    return {"id": None, "line": n, "key": f"{n}:error", "ok": False, "error": message, "code_blocks": 0, "executed_ok": 0}


def _worker_work(state: tuple[Any, _WorkerSetup], payloads: list[tuple[int, Any]]) -> list[dict[str, Any]]:
    """Replay one batch in a worker: ``(line, Record)`` or ``(line, error message)`` each."""
    sandbox, arg = state
    rows: dict[int, dict[str, Any]] = {}
    batch = [(i, n, item) for i, (n, item) in enumerate(payloads) if isinstance(item, Record)]
    for i, (n, item) in enumerate(payloads):
        if not isinstance(item, Record):
            rows[i] = _error_row(n, str(item))
    if batch:
        for (i, _, _), row in zip(
            batch, replay_batch([(n, r) for _, n, r in batch], sandbox=sandbox, config=arg.agent_config, artifacts_dir=arg.artifacts_dir)
        ):
            rows[i] = row
    return [rows[i] for i in range(len(payloads))]


def _worker_lost(payload: tuple[int, Any], reason: str) -> dict[str, Any]:
    """The result line of a record whose worker died twice while it was in flight."""
    n, item = payload
    if not isinstance(item, Record):
        return _error_row(n, str(item))
    return {
        "id": item.id,
        "line": n,
        "key": f"{n}:{item.id}",
        "ok": False,
        "error": reason,
        "stop_reason": "error",
        "code_blocks": 0,
        "executed_ok": 0,
    }


def replay_batch(
    batch: list[tuple[int, Record]], *, sandbox: Any, config: AgentConfig, artifacts_dir: str | os.PathLike | None
) -> list[dict[str, Any]]:
    """Replay records together in ``sandbox``; one scored result line per ``(line, record)``."""
    backend = ReplayBackend({f"{n}:{r.id}": r.response for n, r in batch})
    rounds = max(len(protocol.split_recorded_response(r.response)) for _, r in batch)
    cfg = AgentConfig(**{**config.__dict__, "max_rounds": max(config.max_rounds, rounds)})
    tasks = [Task(r.prompt, r.inputs, id=f"{n}:{r.id}") for n, r in batch]
    rows = []
    with Agent(backend, sandbox, cfg, artifacts_dir=artifacts_dir) as agent:
        trajs = agent.run_batch(tasks)
        for (n, r), traj in zip(batch, trajs):  # scored before temporary images go
            traj.id = r.id
            row = score_replay(r, traj)
            row["line"] = n
            row["key"] = f"{n}:{r.id}"
            rows.append(row)
    return rows


def replay(
    records_path: str | os.PathLike,
    *,
    sandbox: Any = None,
    sandbox_config: Any = None,
    images_root: str | os.PathLike | None = None,
    out_path: str | os.PathLike | None = None,
    config: AgentConfig | None = None,
    batch_size: int = 8,
    workers: int | None = 1,
    ray: str | None = None,
    artifacts_dir: str | os.PathLike | None = None,
    progress: Callable[[int], None] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    allow_absolute_paths: bool = False,
) -> ReplaySummary:
    """Re-execute every record of ``records_path``; see the module docstring.

    Args:
        records_path: JSONL of Thyme records.
        sandbox: a :class:`thyme.sandbox.Sandbox` (used with ``workers=1``; with more workers
            its config is what each worker's own sandbox starts from).
        sandbox_config: the :class:`thyme.sandbox.SandboxConfig` of the workers' sandboxes
            (default: ``sandbox.config``, else the defaults). With ``workers=1`` and no
            ``sandbox``, one is started from it for the run.
        images_root: folder the records' relative image paths are resolved against
            (default: the records file's folder). A path that resolves outside it (absolute,
            ``..``, a symlink pointing out) fails its record (:func:`thyme.records.resolve_data_path`).
        out_path: JSONL written as records finish (one line per record, ``trajectory``
            included), in input order whatever the number of workers. When it already exists,
            records listed there are skipped and their lines count towards the summary: a
            rerun resumes.
        config: agent settings (``max_rounds`` is raised to fit every recorded segment).
        batch_size: records replayed together (their code runs concurrently in the pool).
        workers: worker processes (:mod:`thyme.agent.parallel`), each with its own sandbox;
            ``None``: the usable cores; 1: this process, with ``sandbox``.
        ray: run as Ray tasks instead (``ray.init`` address; ``""``: Ray's default).
        artifacts_dir: where produced images are kept (default: ``<out_path stem>_images``
            beside ``out_path``, else a temporary folder).
        progress: called with the number of records finished (resumed ones included: once
            at the start when there are some), after each batch (each record with workers).
        on_row: called with each record's result line as it is written.
        allow_absolute_paths: the user's opt-in to image paths outside ``images_root``.

    Raises:
        ThymeError: no line of ``records_path`` is a JSON object (:func:`require_json_objects`).

    Returns:
        The totals (``resumed``: records an earlier run finished). A malformed record or a
        failing execution is counted as failed; the run goes on. A last line torn by an
        interrupted run is cut and its record replayed again. A record whose worker died twice
        while replaying it is failed with the reason.
    """
    n_workers = resolve_workers(workers)
    require_json_objects(records_path)
    if ray is not None:
        import_ray()  # a clear error naming the extra, before anything is opened
    summary = ReplaySummary()
    done: set[str] = set()
    out_f: ResumableJsonl | None = None
    if out_path is not None:
        out_path = Path(out_path)
        out_f = ResumableJsonl(out_path, key=lambda row: row.get("key"))  # a torn last line is cut and redone
        done = set(out_f.done)
        for row in out_f.existing:
            summary.add(row)
        summary.resumed = len(out_f.existing)
        if artifacts_dir is None:
            artifacts_dir = out_path.with_name(out_path.stem + "_images")
        _drop_orphan_images(Path(artifacts_dir), out_f.existing)

    def emit(row: dict[str, Any]) -> None:
        summary.add(row)
        if out_f is not None:
            out_f.write(row)
        if on_row is not None:
            on_row(row)

    base = config or AgentConfig()
    finished = summary.resumed  # progress counts from what an earlier run did
    if finished and progress:
        progress(finished)

    def todo() -> Iterator[tuple[int, Record | str]]:
        """The records not done yet, in input order (a malformed one as its message)."""
        for n, item in iter_records(records_path, images_root=images_root, allow_absolute=allow_absolute_paths):
            if isinstance(item, RecordError):
                if f"{n}:error" not in done:
                    yield n, str(item)
            elif f"{n}:{item.id}" not in done:
                yield n, item

    try:
        if n_workers > 1 or ray is not None:
            if sandbox_config is None:
                from ..sandbox.config import SandboxConfig

                sandbox_config = sandbox.config if sandbox is not None else SandboxConfig()
            setup = _WorkerSetup(sandbox_config, base, str(artifacts_dir) if artifacts_dir is not None else None)
            kw = dict(
                batch_size=batch_size,
                setup=_worker_setup,
                setup_arg=setup,
                work=_worker_work,
                failed=_worker_lost,
                teardown=_worker_teardown,
            )
            rows = ray_imap_ordered(todo(), address=ray, **kw) if ray is not None else imap_ordered(todo(), workers=n_workers, **kw)
            for row in rows:
                emit(row)
                finished += 1
                if progress:
                    progress(finished)
            return summary
        own: Any = None
        if sandbox is None:
            from ..sandbox import Sandbox

            sandbox = own = Sandbox(sandbox_config)
        try:
            batch: list[tuple[int, Record]] = []

            def flush() -> None:
                nonlocal finished
                if not batch:
                    return
                for row in replay_batch(batch, sandbox=sandbox, config=base, artifacts_dir=artifacts_dir):
                    emit(row)
                finished += len(batch)
                batch.clear()
                if progress:
                    progress(finished)

            for n, item in todo():
                if not isinstance(item, Record):
                    flush()  # earlier records first: the output stays in input order
                    emit(_error_row(n, item))
                    finished += 1
                    if progress:
                        progress(finished)
                    continue
                batch.append((n, item))
                if len(batch) >= batch_size:
                    flush()
            flush()
        finally:
            if own is not None:
                own.close()
    finally:
        if out_f is not None:
            out_f.close()
    return summary


def _drop_orphan_images(folder: Path, rows: list[dict[str, Any]]) -> None:
    """Remove the per-trajectory image folders under ``folder`` (this replay's own output images)
    that no recorded row refers to: they belong to records an earlier run did not finish writing
    (or whose results file was deleted), which this run replays again and would otherwise keep
    twice (issue 18, defect 8)."""
    if not folder.is_dir():
        return
    import json

    text = json.dumps(rows, ensure_ascii=False)
    keep = set()
    for prefix in (folder.name + "/", str(folder) + "/"):
        start = 0
        while (i := text.find(prefix, start)) >= 0:
            start = i + len(prefix)
            keep.add(text[start:].split("/", 1)[0])
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink() and child.name not in keep:
            shutil.rmtree(child, ignore_errors=True)


def format_row(row: dict[str, Any]) -> str:
    """One human-readable line for a replayed record (``thyme replay`` without ``--json``)."""
    name = row.get("id") or f"line {row.get('line')}"
    if not row.get("ok"):
        return f"FAIL {name}: {row.get('error')}"
    outs = []
    known = row.get("image_sizes")
    executed = [t.get("execution") for t in (row.get("trajectory") or {}).get("turns", []) if t.get("code") is not None]
    for k, ex in enumerate(executed):
        if ex is None:
            continue
        if not ex.get("ok"):
            outs.append("error " + str((ex.get("error") or {}).get("type")))
            continue
        block = known[k] if isinstance(known, list) and k < len(known) else _sizes(ex.get("images", []))
        sizes = ["x".join(map(str, s)) if s else "?" for s in block]
        text = ex.get("stdout", "").strip().replace("\n", " ")
        outs.append(("image " + ",".join(sizes)) if sizes else f"text {text[:24]!r}")
    fixes = sorted({f for block in row.get("fixes", []) for f in block})
    mark = "ok  " if row.get("answer_match") and row.get("outputs_match", 0) == row.get("outputs_checked", 0) else "diff"
    line = f"{mark} {name}: {row.get('code_blocks', 0)} code block(s) -> {'; '.join(outs) or 'no code'}"
    if fixes:
        line += f" [repairs: {', '.join(fixes)}]"
    line += f"; answer {row.get('answer')!r} (recorded {row.get('recorded_answer')!r})"
    return line


def count_records(path: str | os.PathLike) -> int:
    """Number of non-empty lines (for progress bars), in bounded memory (:func:`thyme.jsonl.count_lines`)."""
    from ..jsonl import count_lines

    return count_lines(path)
