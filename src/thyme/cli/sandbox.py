"""``thyme sandbox exec`` / ``thyme sandbox doctor``: the code sandbox on its own."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ThymeError
from .entry import add_sandbox_flags, sandbox_config


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``thyme sandbox`` on the ``thyme`` sub-command parser; returns the new parser."""
    p = subparsers.add_parser("sandbox", help="the code sandbox")
    ssub = p.add_subparsers(dest="sandbox_command", required=True)
    q = ssub.add_parser("exec", help="run one code file against an image")
    q.add_argument("--image", action="append", default=[], help="input image (repeatable)")
    q.add_argument("--code", required=True, help="Python file to run ('-' reads standard input)")
    q.add_argument("--out-dir", default=None, help="copy produced images here (default: a new folder under the current one)")
    q.add_argument("--json", action="store_true", help="print the result as one JSON object")
    add_sandbox_flags(q)
    ssub.add_parser("doctor", help="which confinement layers are active, what model code may import")

    return p


def run(args: argparse.Namespace) -> int:
    from .. import sandbox as sb

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
    result = sb.exec_file([os.path.abspath(p) for p in args.image], code_path, config=cfg, out_dir=args.out_dir)
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
