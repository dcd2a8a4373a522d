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
    p.add_argument("--images-root", default=None, help="folder the records' relative image paths start from (default: the records file's folder)")
    p.add_argument("--allow-absolute-paths", action="store_true", help="accept image paths that leave the images root (absolute, .., symlinks pointing out); only for records you trust")
    p.add_argument("--out", default=None, help="results JSONL, written as records finish; rerun to resume")
    p.add_argument("--json", action="store_true", help="print the totals as one JSON line at the end")
    from ..agent.replay import ReplayConfig
    from ..config import add_fields

    add_fields(p.add_argument_group("workers"), ReplayConfig)
    p.add_argument("--allow-failures", action="store_true", help="exit 0 even when records failed (default: exit 1)")
    add_sandbox_flags(p)
    add_config_flag(p)

    return p


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..agent.parallel import resolve_workers
    from ..agent.replay import ReplayConfig, count_records, format_row, replay
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
    total = count_records(records)
    if total == 0:
        print(f"warning: {records} holds no records; nothing to replay", file=sys.stderr)
    bar = tqdm(total=total, desc="replay", unit="record", file=sys.stderr, disable=None)
    last = [0]

    def progress(n: int) -> None:
        if last[0] == 0 and n and bar.n == 0:  # the first call of a resumed run: start the bar there
            bar.n = bar.initial = bar.last_print_n = n
            bar.refresh()
        else:
            bar.update(n - last[0])
        last[0] = n

    run_cfg = build(ReplayConfig, None, args)
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
        on_row=None if args.json else (lambda row: bar.write(format_row(row), file=sys.stdout)),
    )
    if workers == 1 and run_cfg.ray is None:
        with Sandbox(sb_cfg) as sandbox:
            summary = replay(records, sandbox=sandbox, **kw)
    else:  # each worker starts its own sandbox from this config
        summary = replay(records, sandbox_config=sb_cfg, **kw)
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
