"""``thyme replay``: re-execute recorded Thyme trajectories in the sandbox (:mod:`thyme.agent.replay`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ThymeError
from ..jsonl import ensure_writable
from .entry import add_config_flag, add_sandbox_flags, agent_config, load_sections, sandbox_config


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``thyme replay`` on the ``thyme`` sub-command parser; returns the new parser."""
    p = subparsers.add_parser("replay", help="re-execute recorded Thyme trajectories in the sandbox")
    p.add_argument("records", help="JSONL of Thyme records (image, question, response)")
    p.add_argument(
        "--images-root", default=None, help="folder the records' relative image paths start from (default: the records file's folder)"
    )
    p.add_argument(
        "--allow-absolute-paths",
        action="store_true",
        help="accept image paths that leave the images root (absolute, .., symlinks pointing out); only for records you trust",
    )
    p.add_argument("--out", default=None, help="results JSONL, written as records finish; rerun to resume")
    p.add_argument("--json", action="store_true", help="print the totals as one JSON line at the end")
    from ..agent.replay import ReplayConfig
    from ..config import add_fields

    add_fields(p.add_argument_group("workers"), ReplayConfig)
    p.add_argument("--allow-failures", action="store_true", help="exit 0 even when records failed (default: exit 1)")
    add_sandbox_flags(p)
    add_config_flag(p)

    return p


class CountingProgress:
    """Feeds a :class:`thyme.agent.scheduler.Progress` (tqdm on a terminal, a line every
    ``interval_s`` seconds off one) from the cumulative counts replay, verify and convert report.

    Work an earlier run did (``resumed``) moves the progress's start, so the rate and ETA count
    only this run's work. Counts that go down start a new part (convert's next split): the
    total and the count go on from where the last part ended.
    """

    def __init__(self, total: int | None, *, desc: str, unit: str, interval_s: float):
        self.known_total = total is not None
        self.args = dict(desc=desc, unit=unit, interval_s=interval_s)
        # an unknown total (convert): started at the first count, which convert reports as soon
        # as a split is open, so no line reads "0/0" while the source opens
        self._progress: Any = self._start(total) if total is not None else None
        self.last = 0
        self.offset = 0
        self.resumed = 0
        self.failed = 0

    def _start(self, total: int) -> Any:
        from ..agent.scheduler import Progress

        return Progress(total, **self.args)

    @property
    def progress(self) -> Any:
        """The :class:`thyme.agent.scheduler.Progress` (started with total 0 if no count came yet)."""
        if self._progress is None:
            self._progress = self._start(0)
        return self._progress

    def update(self, done: int, *, resumed: int = 0, failed: int | None = None, total: int | None = None) -> None:
        """``done`` of this part finished, ``resumed`` of them by an earlier run, ``failed`` of
        this run's failed (when known), of ``total`` (when known)."""
        if self._progress is None:
            self._progress = self._start(total if total is not None else done)
        p = self.progress
        if done < self.last:  # a new part
            self.offset += self.last
            self.last = self.resumed = 0
        if total is not None:
            p.total = self.offset + total
        elif not self.known_total:
            p.total = max(p.total, self.offset + done)
        moved = resumed - self.resumed
        if moved:  # done before this run: where it starts
            self.resumed = resumed
            p.skip(moved)
        new_failed = 0 if failed is None else max(0, failed - self.failed)
        if failed is not None:
            self.failed = failed
        ran = done - self.last - moved
        if ran > 0 or new_failed:
            p.advance(max(0, ran), failed=new_failed)
        self.last = done

    def print(self, text: str) -> None:
        """A result line on standard output (above the bar on a terminal)."""
        self.progress.write(text, file=sys.stdout)

    def fail(self) -> None:
        """One more failure (without a count change)."""
        self.failed += 1
        self.progress.advance(0, failed=1)

    def close(self, *, summary: bool = True) -> None:
        if self._progress is not None:
            self._progress.close(summary=summary)


def run(args: argparse.Namespace) -> int:
    from ..agent.parallel import resolve_workers
    from ..agent.replay import ReplayConfig, count_records, format_row, replay, require_json_objects
    from ..config import build
    from ..sandbox import Sandbox

    yaml_cfg = load_sections(args, {"agent", "sandbox"})  # a model section (run / eval) is ignored with a note
    records = Path(args.records)
    if not records.is_file():
        raise ThymeError(f"records file not found: {records}", "pass a JSONL file of Thyme records")
    images_root = args.images_root if args.images_root is not None else str(records.parent)
    if not Path(images_root).is_dir():
        raise ThymeError(f"--images-root is not a folder: {images_root}")
    if args.out:
        ensure_writable(args.out, what="--out")
    require_json_objects(records)  # an image or a CSV: one clear error, not one FAIL line per line of text
    total = count_records(records)
    if total == 0:
        print(f"warning: {records} holds no records; nothing to replay", file=sys.stderr)
    run_cfg = build(ReplayConfig, None, args)
    bar = CountingProgress(total, desc="replay", unit="record", interval_s=run_cfg.progress_interval_s)
    seen = [0]

    def progress(n: int) -> None:  # n counts the records an earlier run replayed (on_row does not see them)
        bar.update(n, resumed=n - seen[0])

    def on_row(row: dict[str, Any]) -> None:
        seen[0] += 1
        if not row.get("ok"):
            bar.fail()
        if not args.json:
            bar.print(format_row(row))

    workers = min(resolve_workers(run_cfg.workers), max(1, -(-total // max(1, run_cfg.batch_size))))  # no idle workers
    sb_cfg = sandbox_config(args, yaml_cfg)
    kw = dict(
        images_root=images_root,
        allow_absolute_paths=args.allow_absolute_paths,
        out_path=args.out,
        config=agent_config(args, yaml_cfg),
        batch_size=run_cfg.batch_size,
        workers=workers,
        ray=run_cfg.ray,
        progress=progress,
        on_row=on_row,
    )
    try:
        if workers == 1 and run_cfg.ray is None:
            with Sandbox(sb_cfg) as sandbox:
                summary = replay(records, sandbox=sandbox, **kw)
        else:  # each worker starts its own sandbox from this config
            summary = replay(records, sandbox_config=sb_cfg, **kw)
    except BaseException:
        bar.close(summary=False)
        raise
    bar.close()
    d = summary.to_dict()
    if not args.json:
        for k, v in d.items():
            if k != "failures":
                print(f"{k:>14}: {v}")
        if args.out:
            print(f"results written to {args.out}")
    else:
        print(json.dumps(d, ensure_ascii=False))
    if summary.failed and not args.allow_failures:
        print(f"{summary.failed} of {summary.trajectories} record(s) failed (exit status 1; --allow-failures keeps 0)", file=sys.stderr)
        return 1
    return 0
