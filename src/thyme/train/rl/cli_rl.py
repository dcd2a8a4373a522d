"""Argument parsing of ``thyme train rl`` (hooked into :mod:`thyme.train.commands`).

Also runnable as a module, which is how ``accelerate launch`` starts it on every process::

    accelerate launch --config_file configs/accelerate_zero3.yaml -m thyme.train.rl.cli_rl \\
        --config configs/rl_grpo_ats.yaml --model runs/sft_stage2 --train-file data/rl.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_rl_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("--config", default=None, help="YAML config (configs/rl_grpo_ats.yaml)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field (YAML value), repeatable: --set beta=0.001")
    q.add_argument("--model", default=None, help="policy checkpoint (the SFT model)")
    q.add_argument("--train-file", action="append", default=None, help="JSONL of RL records or benchmark rows (repeatable)")
    q.add_argument("--output-dir", default=None, help="checkpoints, rollouts.jsonl and the final model")
    q.add_argument("--resume", nargs="?", const="latest", default=None, help="resume from a checkpoint folder, or the latest in output_dir")
    q.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    q.add_argument("--json", action="store_true", help="print the summary as one JSON line")


def add_rl_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``rl`` on the ``thyme train`` subparsers."""
    q = subparsers.add_parser("rl", help="GRPO-ATS reinforcement learning with sandbox rollouts (TRL GRPOTrainer)")
    add_rl_arguments(q)
    return q


def run_rl(args: argparse.Namespace) -> int:
    """Run a parsed ``thyme train rl``; prints the summary; returns the exit status."""
    from ..sft_config import parse_set
    from .config import load_rl_config
    from .run import train_rl

    overrides = parse_set(args.set)
    for key, value in (("model", args.model), ("train_files", args.train_file), ("output_dir", args.output_dir),
                       ("resume_from_checkpoint", args.resume), ("max_steps", args.max_steps)):
        if value is not None:
            overrides[key] = value
    result = train_rl(load_rl_config(args.config, overrides))
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        for k, v in result.items():
            print(f"{k:>28}: {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m thyme.train.rl.cli_rl --config ...`` (for ``accelerate launch``)."""
    from ...errors import ThymeError

    p = argparse.ArgumentParser(prog="thyme train rl")
    add_rl_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_rl(args)
    except ThymeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
