"""``thyme report INPUT --out report.html``: the HTML trajectory report (see :mod:`thyme.report`).

INPUT is a trajectory JSON (``thyme run --out``), a results JSONL (``thyme replay --out``), an
eval ``predictions.jsonl``, or an eval output folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``report`` on the ``thyme`` sub-command parser; returns the new parser."""
    p = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report of trajectories (a run, a replay, an eval)",
        description="One HTML file with every trajectory: question, input image with the cropped regions, "
        "each round's reasoning and highlighted code with its repairs, output images, answer and result; "
        "an index with filters (correct / wrong, tool used, category).",
    )
    p.add_argument("input", help="trajectory JSON, replay results / eval predictions JSONL, or an eval output folder")
    p.add_argument("--out", default=None, help="HTML file to write (default: report.html beside INPUT, inside it for a folder)")
    p.add_argument("--title", default=None, help="page title")
    p.add_argument("--max-image-side", type=int, default=None, help="longest side of embedded images in pixels (default 1024)")
    p.add_argument("--records", default=None, help="Thyme records JSONL a replay ran on: joins answer_gt / category / benchmark by id")
    p.add_argument("--only", choices=["correct", "wrong", "unscored", "tool", "no-tool"], default=None, help="keep only these trajectories")
    p.add_argument("--limit", type=int, default=None, help="keep at most N trajectories (after --only)")
    p.add_argument("--force", action="store_true", help="overwrite a report written by another command or from another input")
    p.add_argument("--allow-absolute-paths", action="store_true", help="embed images from anywhere the input names (default: only files inside INPUT's folder, the run it renders, and the --records file's folder)")
    return p


def run(args: argparse.Namespace) -> int:
    """Write the report; prints its path, size and count. Returns 0.

    Raises:
        thyme.report.ReportError: the input cannot be read (a ThymeError: the CLI prints it, exit 2).
    """
    from ..jsonl import ensure_writable
    from ..report import MAX_IMAGE_SIDE, ReportError, load_items, load_provenance, report_source, write_report

    src = Path(args.input)
    out = Path(args.out) if args.out else (src / "report.html" if src.is_dir() else src.with_name("report.html"))
    source = f"thyme report {src.resolve()}"
    if out.exists() and not args.force:
        before = report_source(out)
        if before != source:
            what = "is not a thyme report" if before is None else (f"was written by `{before}`" if before else "was written by another thyme command")
            raise ReportError(f"{out} {what}; not overwriting it", "pass --out NEW.html, or --force to overwrite it")
    ensure_writable(out, what="--out")
    items = load_items(src, records=args.records)
    provenance = load_provenance(src, items)
    if args.only:
        keep = {
            "correct": lambda it: it.correct is True,
            "wrong": lambda it: it.correct is False,
            "unscored": lambda it: it.correct is None,
            "tool": lambda it: it.trajectory is not None and it.trajectory.tool_used,
            "no-tool": lambda it: it.trajectory is None or not it.trajectory.tool_used,
        }[args.only]
        items = [it for it in items if keep(it)]
    if args.limit is not None:
        if args.limit < 0:
            raise ReportError(f"--limit must be >= 0, got {args.limit}")
        items = items[: args.limit]
    # only files of the run it renders are embedded: INPUT's folder, and the folder of the
    # --records file the user names (a replay's input images live there)
    roots = [str(src if src.is_dir() else src.resolve().parent)] + ([str(Path(args.records).resolve().parent)] if args.records else [])
    path = write_report(
        items, out, title=args.title, max_image_side=args.max_image_side or MAX_IMAGE_SIDE, source=source, provenance=provenance,
        roots=roots, allow_absolute=args.allow_absolute_paths,
    )
    size = path.stat().st_size
    print(f"{path} ({len(items)} trajectories, {size / 1e6:.1f} MB)")
    return 0
