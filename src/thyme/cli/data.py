"""``thyme data``: ``convert``, ``verify``, ``show-masks`` (wired into :mod:`thyme.cli` by ``add_parser``/``run``).

Errors in the user's input raise :class:`thyme.errors.ThymeError` (the cli prints them, exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ThymeError
from .entry import add_sandbox_flags, sandbox_config


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``thyme data {convert,verify,show-masks}`` on an argparse subparsers object."""
    from ..config import add_fields
    from ..data.convert import ConvertConfig
    from ..data.masks import MaskConfig
    from ..data.verify import VerifyConfig

    p = subparsers.add_parser("data", help="SFT data: convert released datasets, execution filtering, loss masks")
    sub = p.add_subparsers(dest="data_command", required=True)

    q = sub.add_parser("convert", help="released Thyme datasets (hub id or parquet / JSONL files) to local JSONL + images")
    q.add_argument("source", help="hub id (Kwai-Keye/Thyme-SFT, Kwai-Keye/Thyme-RL) or a parquet / JSON / JSONL file or folder")
    q.add_argument("--out", required=True, help="records JSONL to write (appended; a rerun resumes)")
    add_fields(q, ConvertConfig)
    q.add_argument("--json", action="store_true", help="print the totals as one JSON line")

    q = sub.add_parser("verify", help="re-execute every record's code; keep records whose outputs match (execution filtering)")
    q.add_argument("records", help="JSONL of Thyme SFT records")
    q.add_argument("--kept", default=None, help="kept records (default: <stem>.kept.jsonl beside the input)")
    q.add_argument("--rejected", default=None, help="rejected records with the reason (default: <stem>.rejected.jsonl)")
    q.add_argument("--images-root", default=None, help="folder relative image paths start from (default: the records file's folder)")
    q.add_argument("--json", action="store_true", help="print the totals as one JSON line")
    add_fields(q, VerifyConfig)
    add_sandbox_flags(q)

    q = sub.add_parser("show-masks", help="print the text a record trains on (the loss-mask spans)")
    q.add_argument("records", help="JSONL of Thyme SFT records")
    q.add_argument("--model", required=True, help="checkpoint (folder or hub id) whose processor and chat template render the record")
    q.add_argument("--index", type=int, required=True, help="which record (counting from 0)")
    q.add_argument("--json", action="store_true", help="print a JSON list of the trained spans' texts")
    q.add_argument("--images-root", default=None, help="folder relative image paths start from (default: the records file's folder)")
    q.add_argument("--allow-absolute-paths", action="store_true", help="accept image paths that leave the images root (absolute, .., symlinks pointing out); only for records you trust")
    q.add_argument("--config", default=None, help="SFT config YAML whose mask settings to use (last_round_only, max_pixels, min_pixels, system_prompt)")
    add_fields(q, MaskConfig, ("max_pixels", "min_pixels"))
    q.add_argument("--all-rounds", action="store_true", help="train every round (turn last_round_only off)")
    return p


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``thyme data ...`` command; returns the exit status."""
    cmd = args.data_command
    if cmd == "convert":
        return _convert(args)
    if cmd == "verify":
        return _verify(args)
    if cmd == "show-masks":
        return _show_masks(args)
    raise ThymeError(f"unknown data command {cmd!r}")


def _convert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..config import build
    from ..data.convert import ConvertConfig, convert, format_summary

    cfg = build(ConvertConfig, None, args)
    bar = tqdm(desc="convert", unit="row", file=sys.stderr, disable=None)

    def progress(n: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.n = n
        bar.refresh()

    summary = convert(args.source, args.out, cfg, progress=progress)
    bar.close()
    print(json.dumps(summary.to_dict(), ensure_ascii=False) if args.json else format_summary(summary))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..config import build
    from ..agent.parallel import resolve_workers
    from ..data.verify import VerifyConfig, format_summary, verify
    from ..sandbox import Sandbox

    records = Path(args.records)
    if not records.is_file():
        raise ThymeError(f"records file not found: {records}", "pass a JSONL file of Thyme SFT records")
    stem = records.with_suffix("")
    kept = args.kept or f"{stem}.kept.jsonl"
    rejected = args.rejected or f"{stem}.rejected.jsonl"
    cfg = build(VerifyConfig, None, args)
    sb_cfg = sandbox_config(args, {})
    from ..jsonl import count_lines

    total = count_lines(records)  # bounded memory; a non-UTF-8 line counts too
    bar = tqdm(total=total, desc="verify", unit="record", file=sys.stderr, disable=None)
    last = [0]

    def progress(n: int) -> None:
        bar.update(n - last[0])
        last[0] = n

    kw = dict(kept_path=kept, rejected_path=rejected, images_root=args.images_root, config=cfg, progress=progress)
    if resolve_workers(cfg.workers) == 1 and cfg.ray is None:
        with Sandbox(sb_cfg) as sandbox:
            summary = verify(records, sandbox=sandbox, **kw)
    else:  # each worker starts its own sandbox from this config
        summary = verify(records, sandbox_config=sb_cfg, **kw)
    bar.close()
    print(json.dumps(summary.to_dict(), ensure_ascii=False) if args.json else format_summary(summary))
    return 0


def _show_masks(args: argparse.Namespace) -> int:
    from ..backends.processors import load_processor
    from ..data.masks import MaskConfig, encode_record, prepare_processor, show_masks
    from ..data.records import read_record

    mask = MaskConfig()
    if args.config:
        from ..train.sft_config import load_sft_config

        sft = load_sft_config(args.config)
        mask = MaskConfig(last_round_only=sft.last_round_only, min_pixels=sft.min_pixels, max_pixels=sft.max_pixels, system_prompt=sft.system_prompt)
    if args.max_pixels is not None:
        mask.max_pixels = args.max_pixels
    if args.min_pixels is not None:
        mask.min_pixels = args.min_pixels
    if args.all_rounds:
        mask.last_round_only = False
    rec = read_record(args.records, args.index, images_root=args.images_root, allow_absolute=args.allow_absolute_paths)
    processor = prepare_processor(load_processor(args.model), mask)
    sample = encode_record(rec, processor, mask)
    print(show_masks(sample, as_json=args.json))
    return 0
