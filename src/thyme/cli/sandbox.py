"""``thyme sandbox exec`` / ``thyme sandbox doctor`` / ``thyme sandbox sweep``: the code sandbox on its own."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ThymeError
from ..sandbox.oneshot import OutputFolder
from .entry import add_sandbox_flags, sandbox_config


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``thyme sandbox`` on the ``thyme`` sub-command parser; returns the new parser."""
    p = subparsers.add_parser("sandbox", help="the code sandbox")
    ssub = p.add_subparsers(dest="sandbox_command", required=True)
    q = ssub.add_parser("exec", help="run one code file against an image")
    q.add_argument("--image", action="append", default=[], help="input image (repeatable)")
    q.add_argument("--code", required=True, help="Python file to run ('-' reads the code from standard input)")
    q.add_argument(
        "--out-dir",
        default=None,
        help=(
            "copy produced images here: created (mode 0700) if missing; refused before the run (exit 2) when a path component is a "
            "symbolic link, or it is not a folder, not writable, or owned or writable by another user; outputs never replace a file "
            "(a taken name gets a numbered one). Default: a fresh private temporary folder (mkdtemp under $TMPDIR), printed"
        ),
    )
    q.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_sandbox_flags(q)
    d = ssub.add_parser("doctor", help="which confinement layers are active, what model code may import")
    d.add_argument("--sweep", action="store_true", help="first remove what sandboxes of dead owners left (same as `thyme sandbox sweep`)")
    w = ssub.add_parser(
        "sweep", help="remove the folders, mounts and cgroups of sandboxes whose owner died (e.g. SIGKILL), without starting one"
    )
    w.add_argument("--tmpdir", default=None, help="the temporary folder the sandboxes used (default: $TMPDIR, else /tmp)")

    return p


def run(args: argparse.Namespace) -> int:
    from .. import sandbox as sb

    if args.sandbox_command == "sweep" or (args.sandbox_command == "doctor" and args.sweep):
        _sweep(getattr(args, "tmpdir", None))
        if args.sandbox_command == "sweep":
            return 0
    if args.sandbox_command == "doctor":
        print(sb.format_doctor(sb.doctor()))
        return 0
    code_path = args.code
    if code_path != "-" and not Path(code_path).is_file():
        raise ThymeError(f"code file not found: {code_path}")
    from ..imageio import image_size

    for img in args.image:
        image_size(img)
    cfg = sandbox_config(args, {})
    folder = OutputFolder(args.out_dir)  # checked before the run: OutDirError exits 2
    code = sys.stdin.read() if code_path == "-" else None
    try:
        result = sb.exec_file([os.path.abspath(p) for p in args.image], code_path, config=cfg, out_dir=folder, code=code)
    finally:
        folder.close()
    if folder.written:
        print(f"[out-dir] {folder.path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        if result.stdout:
            sys.stdout.write(result.stdout if result.stdout.endswith("\n") else result.stdout + "\n")
        for f in result.fixes:
            print(f"[fix] {f.name}: {f.detail}", file=sys.stderr)
        for p in result.images:
            print(f"[image] {p}", file=sys.stderr)
        if result.error is not None:
            print(result.error.traceback or f"{result.error.type}: {result.error.message}", file=sys.stderr)
    return 0 if result.ok else 1


def _sweep(tmpdir: str | None) -> None:
    """Remove what sandboxes of dead owners left; print one line per removed item."""
    from ..sandbox.stale import sweep

    report = sweep(tmpdir)
    for line in report.lines():
        print(line)
    if not report.lines():
        print(f"nothing to sweep (no sandbox of a dead owner in {tmpdir or tempfile.gettempdir()}, no stale cgroup folder)")
