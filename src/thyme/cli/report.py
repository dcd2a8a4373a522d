"""``thyme report INPUT --out report.html``: the HTML trajectory report (see :mod:`thyme.report`).

INPUT is a trajectory JSON (``thyme run --out``), a results JSONL (``thyme replay --out``), an
eval ``predictions.jsonl``, or a folder. The page follows the input (:mod:`thyme.report.pages`):

- an eval output folder (``predictions.jsonl`` + ``metrics.json``): its summary page with plots,
  ``summary.html`` in the folder (eval's own ``report.html`` holds the trajectories and is left
  as it is; ``--trajectories`` writes the trajectory report instead);
- two eval folders (``thyme report RUN_A RUN_B``): the comparison page, ``compare-A-vs-B.html``
  beside RUN_A;
- a ``thyme train rl`` output folder (``rollouts.jsonl`` / ``trainer_state.json``): the training
  curves, ``training.html`` in the folder;
- anything else: the trajectory report (``report.html`` beside INPUT, inside it for a folder).
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
    p.add_argument(
        "input",
        nargs="+",
        help="trajectory JSON, replay results / eval predictions JSONL, an eval output folder (its summary), "
        "two eval folders (their comparison), or a thyme train rl output folder (its training curves)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="HTML file to write (default: report.html beside INPUT, inside it for a folder; summary.html in an eval folder; "
        "compare-A-vs-B.html beside RUN_A; training.html in an RL output folder)",
    )
    p.add_argument(
        "--trajectories",
        action="store_true",
        help="of an eval folder: write the trajectory report (report.html) instead of the summary page (implied by --only / --limit / --records)",
    )
    p.add_argument(
        "--max-flipped", type=int, default=None, help="comparison: render at most N flipped questions' trajectories per direction"
    )
    p.add_argument("--title", default=None, help="page title")
    p.add_argument("--max-image-side", type=int, default=None, help="longest side of embedded images in pixels (default 1024)")
    p.add_argument("--records", default=None, help="Thyme records JSONL a replay ran on: joins answer_gt / category / benchmark by id")
    p.add_argument("--only", choices=["correct", "wrong", "unscored", "tool", "no-tool"], default=None, help="keep only these trajectories")
    p.add_argument("--limit", type=int, default=None, help="keep at most N trajectories (after --only)")
    p.add_argument("--force", action="store_true", help="overwrite a report written by another command or from another input")
    p.add_argument(
        "--allow-absolute-paths",
        action="store_true",
        help="embed images from anywhere the input names (default: only files inside INPUT's folder, the run it renders, and the --records file's folder)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Write the report; prints its path, size and count. Returns 0.

    Raises:
        thyme.report.ReportError: the input cannot be read (a ThymeError: the CLI prints it, exit 2).
    """
    from ..jsonl import ensure_writable
    from ..report import MAX_IMAGE_SIDE, ReportError, load_items, load_provenance, write_report
    from ..report.pages import is_eval_folder, is_training_folder, write_comparison, write_summary, write_training

    inputs = [Path(x) for x in args.input]
    if len(inputs) > 2:
        raise ReportError(f"thyme report takes one input, or two eval folders to compare; got {len(inputs)}")
    src = inputs[0]
    trajectories = args.trajectories or args.only or args.limit is not None or args.records
    if len(inputs) == 2:
        kind = "compare"
        default = src.resolve().parent / f"compare-{src.resolve().name}-vs-{inputs[1].resolve().name}.html"
    elif is_eval_folder(src) and not trajectories:
        kind, default = "summary", src / "summary.html"
    elif is_training_folder(src) and not trajectories:
        kind, default = "training", src / "training.html"
    else:
        kind, default = "trajectories", (src / "report.html" if src.is_dir() else src.with_name("report.html"))
    out = Path(args.out) if args.out else default
    source = f"thyme report {' '.join(str(x.resolve()) for x in inputs)}" + ("" if kind == "trajectories" else f" ({kind})")
    _check_overwrite(out, source, args.force)
    ensure_writable(out, what="--out")
    if kind != "trajectories":
        if kind == "summary":
            path = write_summary(src, out, title=args.title, source=source)
        elif kind == "training":
            path = write_training(src, out, title=args.title, source=source)
        else:
            path = write_comparison(
                src,
                inputs[1],
                out,
                title=args.title,
                source=source,
                max_image_side=args.max_image_side or MAX_IMAGE_SIDE,
                allow_absolute=args.allow_absolute_paths,
                max_flipped=args.max_flipped,
            )
        print(f"{path} ({kind} page, {path.stat().st_size / 1e6:.1f} MB)")
        return 0
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
        items,
        out,
        title=args.title,
        max_image_side=args.max_image_side or MAX_IMAGE_SIDE,
        source=source,
        provenance=provenance,
        roots=roots,
        allow_absolute=args.allow_absolute_paths,
    )
    size = path.stat().st_size
    print(f"{path} ({len(items)} trajectories, {size / 1e6:.1f} MB)")
    return 0


def _check_overwrite(out: Path, source: str, force: bool) -> None:
    """Refuse to overwrite a file that is not a report this command wrote from this input."""
    from ..report import ReportError, report_source

    if not out.exists() or force:
        return
    before = report_source(out)
    if before != source:
        what = (
            "is not a thyme report"
            if before is None
            else (f"was written by `{before}`" if before else "was written by another thyme command")
        )
        raise ReportError(f"{out} {what}; not overwriting it", "pass --out NEW.html, or --force to overwrite it")
