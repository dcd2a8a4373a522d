"""``thyme train sft`` and ``thyme train rl`` (wired into :mod:`thyme.cli` by ``add_parser``/``run``).

Also runnable as a module, which is how ``accelerate launch`` starts it on every process::

    accelerate launch --config_file configs/accelerate_zero2.yaml -m thyme.cli train \\
        sft --config configs/sft_stage1.yaml
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import ThymeError

#: ``thyme train STAGE``: help, example config, what ``--train-file`` holds.
STAGES = {
    "sft": (
        "supervised fine-tuning on Thyme SFT records (TRL SFTTrainer, our collator and masks)",
        "configs/sft_stage1.yaml, configs/sft_stage2_math.yaml",
        "JSONL of SFT records",
    ),
    "rl": (
        "GRPO-ATS reinforcement learning with sandbox rollouts (TRL GRPOTrainer)",
        "configs/rl_grpo_ats.yaml",
        "JSONL of RL records or benchmark rows",
    ),
}


def _settings_help(stage: str) -> str:
    """The settings a stage's ``--help`` lists (built without importing TRL)."""
    if stage == "rl":
        from ..train.rl.config import settings_help

        return settings_help()
    from ..train.sft_config import settings_help as sft_settings_help

    return sft_settings_help()


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``thyme train sft`` and ``thyme train rl`` on an argparse subparsers object."""
    p = subparsers.add_parser("train", help="training: SFT (stage 1, math annealing), RL (GRPO-ATS)")
    sub = p.add_subparsers(dest="train_command", required=True)
    for stage, (help_text, configs, files) in STAGES.items():
        q = sub.add_parser(
            stage,
            help=help_text,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="settings (YAML keys of --config, or --set KEY=VALUE; --set SECTION.KEY=VALUE for a section's field):\n"
            + _settings_help(stage),
        )
        q.add_argument("--config", default=None, help=f"YAML config ({configs})")
        q.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field (YAML value), repeatable: --set learning_rate=2e-5"
            + (", --set sandbox.allow_weaker=true" if stage == "rl" else ""),
        )
        q.add_argument("--model", default=None, help="base checkpoint (overrides the config's model)")
        q.add_argument("--train-file", action="append", default=None, help=f"{files} (repeatable; replaces the config's train_files)")
        q.add_argument("--output-dir", default=None, help="where checkpoints and the final model go")
        q.add_argument(
            "--resume", nargs="?", const="latest", default=None, help="resume from a checkpoint folder, or the latest in output_dir"
        )
        q.add_argument(
            "--overwrite",
            action="store_true",
            help="start afresh in an output_dir holding an earlier run (removes its checkpoints, model files"
            + (" and rollouts" if stage == "rl" else "")
            + "; other files stay)",
        )
        q.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
        q.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return p


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``thyme train sft|rl`` command; returns the exit status."""
    from ..config import parse_set

    if args.train_command not in STAGES:
        raise ThymeError(f"unknown train command {args.train_command!r}")
    overrides = parse_set(args.set)
    for key, value in (
        ("model", args.model),
        ("train_files", args.train_file),
        ("output_dir", args.output_dir),
        ("resume_from_checkpoint", args.resume),
        ("max_steps", args.max_steps),
    ):
        if value is not None:
            overrides[key] = value
    if args.train_command == "rl":
        from ..train.rl.config import load_rl_config
        from ..train.rl.run import train_rl

        result = train_rl(load_rl_config(args.config, overrides), overwrite=args.overwrite)
    else:
        from ..train.sft import train_sft
        from ..train.sft_config import load_sft_config

        result = train_sft(load_sft_config(args.config, overrides), overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        for k, v in result.items():
            print(f"{k:>28}: {v}")
    return 0
