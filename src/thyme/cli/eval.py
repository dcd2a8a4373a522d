"""``thyme eval`` and ``thyme eval score``: argument parsing over :mod:`thyme.evaluate.runner`.

Wiring (in :mod:`thyme.cli`)::


    eval_commands.add_parser(sub)          # in build_parser(), sub = parser.add_subparsers(...)
    COMMANDS["eval"] = eval_commands.run   # run(args) -> exit status

Command lines::

    thyme eval --benchmark NAME --data PATH [--images-root DIR]
               (--model ID | --base-url URL --model NAME | --replay RECORDS)
               --out DIR [--limit N] [--concurrency N] [--num-shards N --shard I]
    thyme eval score --benchmark NAME --data PATH --predictions predictions.jsonl [--json]

``eval`` is one parser whose optional sub-command is ``score``: the run options live on
``eval`` itself, ``score`` has its own. Configuration: dataclass defaults (the reference's
evaluation settings), then ``--config FILE.yaml`` (sections ``eval``, ``agent``, ``sandbox``,
``model``, ``judge``), then flags.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ThymeError
from .backend import add_server_flags, choose_backend
from .entry import (
    JUDGE_KEY_ENV,
    add_agent_flags,
    add_config_flag,
    add_hf_flags,
    add_sandbox_flags,
    agent_config,
    env_key,
    load_sections,
    missing_folders,
    remove_empty_folders,
    sandbox_config,
)

#: Judge fields exposed as ``--judge-*`` flags; the key also from ``THYME_JUDGE_API_KEY``.
JUDGE_FLAGS = ("base_url", "model", "api_key", "response_format", "timeout_s", "max_retries")
#: EvalConfig fields exposed as flags (all of them).
EVAL_FLAGS = (
    "benchmark",
    "data",
    "images_root",
    "out",
    "limit",
    "concurrency",
    "num_shards",
    "shard",
    "schedule",
    "retry_failed",
    "report",
    "allow_absolute_paths",
)
#: The backends ``eval`` offers, in the order its messages list them (:mod:`thyme.rollout.registry`).
EVAL_BACKENDS = ("hf", "openai", "replay")


def _add_judge_flags(p: argparse.ArgumentParser) -> None:
    from ..config import add_fields
    from ..scoring.judge import JudgeConfig

    g = p.add_argument_group(
        "judge (only for answers no rule can read; off unless --judge-base-url is given)",
        f"the key: --judge-api-key, the judge section's api_key, or the environment variable {JUDGE_KEY_ENV} (keeps it out of ps)",
    )
    add_fields(g, JudgeConfig, JUDGE_FLAGS, prefix="judge-")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` (with its ``score`` sub-command) on the ``thyme`` sub-parsers."""
    from ..config import add_fields
    from ..evaluate.runner import EvalConfig

    p = subparsers.add_parser(
        "eval",
        usage="thyme eval --benchmark NAME --data PATH [--images-root DIR]\n"
        "                  (--model ID | --base-url URL --model NAME | --replay RECORDS)\n"
        "                  --out DIR [--limit N] [--concurrency N] [--num-shards N --shard I] [options]\n"
        "       thyme eval score --benchmark NAME --data PATH --predictions predictions.jsonl [--json]",
        help="evaluate on V* / HR-Bench / MME-RealWorld (or re-score saved predictions: eval score)",
        description="Run a benchmark through the Thyme agent: predictions.jsonl as questions finish, then metrics.json and report.html. "
        "Rerun with the same --out to resume. `thyme eval score ...` re-scores saved predictions.",
    )
    add_fields(p, EvalConfig, EVAL_FLAGS)
    src = p.add_argument_group("what answers (one of)")
    src.add_argument(
        "--model", default=None, help="hub id or local checkpoint (transformers backend); with --base-url: the served model name"
    )
    add_server_flags(p, src, settings=False)
    add_fields(src, EvalConfig, ("replay",))
    add_hf_flags(p, title="model (transformers backend; pixel budget also for --base-url; YAML section model)")
    add_server_flags(p, where=False)
    add_agent_flags(
        p,
        ("max_new_tokens", "max_rounds", "temperature", "seed", "on_error", "shown_path", "ats"),
        title="agent (defaults: the reference's evaluation)",
    )
    add_sandbox_flags(p)
    add_config_flag(p, "eval/agent/sandbox/model/judge")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in --out (its predictions, metrics and report are removed) instead of resuming",
    )
    p.add_argument("--allow-failures", action="store_true", help="exit 0 even when questions failed (default: exit 1)")
    _add_judge_flags(p)

    sub = p.add_subparsers(dest="eval_command", title="sub-command", metavar="score")
    q = sub.add_parser(
        "score",
        help="re-score saved predictions (no generation, no images)",
        description="Score a predictions JSONL (rows with question_id and prediction) against a benchmark file and print metrics.json's content.",
    )
    q.add_argument("--benchmark", required=True, help="vstar, hrbench4k, hrbench8k, mme-realworld, mme-realworld-lite")
    q.add_argument("--data", required=True, help="the benchmark file the predictions answer")
    q.add_argument(
        "--predictions", required=True, help="predictions.jsonl (question_id, prediction; error/tool_used/rounds used when present)"
    )
    q.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    q.add_argument("--images-root", default=None, help=argparse.SUPPRESS)
    q.add_argument("--out", default=None, help="also write the metrics JSON to this file")
    add_config_flag(q, "judge (others are ignored)")
    _add_judge_flags(q)
    return p


# --------------------------------------------------------------------------- config


def _judge(args: argparse.Namespace, yaml_cfg: dict[str, Any]) -> Any:
    from ..config import build
    from ..scoring.judge import JudgeClient, JudgeConfig

    section = dict(yaml_cfg.get("judge") or {})
    cfg = build(JudgeConfig, section, args, names=JUDGE_FLAGS, prefix="judge-", section_name="judge")
    if not cfg.api_key:
        cfg.api_key = env_key(JUDGE_KEY_ENV)
    if not cfg.base_url:
        return None
    return JudgeClient(cfg)


def _eval_config(args: argparse.Namespace, yaml_cfg: dict[str, Any]):
    from ..config import build
    from ..evaluate.runner import EvalConfig

    return build(EvalConfig, yaml_cfg.get("eval"), args, names=(*EVAL_FLAGS, "replay"), section_name="eval")


# --------------------------------------------------------------------------- commands


def _report_writer(
    items: list[dict[str, Any]], path: Path, *, title: str | None = None, roots: list[str] | None = None, allow_absolute: bool = False
) -> Path:
    """The eval's report: embeds only images inside the run folder and the folders the run read
    its images from (``roots``; README: Paths in data)."""
    from ..report import write_report

    prov = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        from ..jsonl import loads_bounded

        prov = loads_bounded((path.parent / "metrics.json").read_bytes(), what="metrics.json").get("provenance")
    return write_report(
        items,
        path,
        title=title,
        source=f"thyme eval {path.parent.resolve()}",
        provenance=prov,
        roots=[str(path.parent), *(roots or [])],
        allow_absolute=allow_absolute,
    )


def run(args: argparse.Namespace) -> int:
    """Entry point for ``thyme eval`` / ``thyme eval score``; returns the exit status.

    Raises:
        ThymeError: bad arguments or input (the CLI prints it and exits with 2).
    """
    if getattr(args, "eval_command", None) == "score":
        return _score(args)
    return _run(args)


def _score(args: argparse.Namespace) -> int:
    from ..evaluate.runner import format_metrics, rescore

    yaml_cfg = load_sections(args, {"judge"})
    if args.out:
        from ..jsonl import ensure_writable

        ensure_writable(args.out, what="--out")
    metrics = rescore(args.benchmark, args.data, args.predictions, judge=_judge(args, yaml_cfg))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(metrics, ensure_ascii=False))
    else:
        print(format_metrics(metrics))
    return 0


def _run(args: argparse.Namespace) -> int:
    yaml_cfg = load_sections(args, {"eval", "agent", "sandbox", "model", "judge"})
    cfg = _eval_config(args, yaml_cfg)
    missing = [flag for flag, v in (("--benchmark", cfg.benchmark), ("--data", cfg.data), ("--out", cfg.out)) if not v]
    if missing:
        raise ThymeError(
            f"thyme eval needs {', '.join(missing)}",
            "thyme eval --benchmark NAME --data PATH (--model ID | --base-url URL --model NAME | --replay RECORDS) --out DIR",
        )
    created = missing_folders(cfg.out, folder=True)
    try:
        return _evaluate(args, yaml_cfg, cfg)
    except BaseException:  # a failed run leaves no empty --out folder behind (results so far are kept)
        remove_empty_folders(created, disposable=("images",))
        raise


def _evaluate(args: argparse.Namespace, yaml_cfg: dict[str, Any], cfg: Any) -> int:
    from ..evaluate.runner import format_metrics, run_eval

    choice = choose_backend(args, yaml_cfg, kinds=EVAL_BACKENDS, replay=cfg.replay, defaults={"concurrency": cfg.concurrency})
    from ..jsonl import ensure_writable

    ensure_writable(cfg.out, what="--out", folder=True)  # before any data is read or model loaded
    agent_cfg = agent_config(args, yaml_cfg)
    sandbox_cfg = sandbox_config(args, yaml_cfg)
    factory = None if cfg.replay else choice.factory()  # replay: run_eval reads the records
    precheck = on_backend = None
    if choice.local:  # a model loaded here: its inputs are checked before it loads, its prompts after
        from ..agent.preflight import check_images_decode, check_prompt_fits

        def precheck(rows: list[Any]) -> None:  # before the model loads
            check_images_decode([r.image for r in rows if r.image])

        def on_backend(backend: Any, rows: list[Any]) -> None:  # before generating
            from ..evaluate.benchmarks import get_benchmark

            spec = get_benchmark(cfg.benchmark)
            check_prompt_fits(backend, [(r.key, spec.question(r), [r.image] if r.image else []) for r in rows], agent_cfg)

    result = run_eval(
        cfg,
        agent_config=agent_cfg,
        sandbox_config=sandbox_cfg,
        backend_factory=factory,
        judge=_judge(args, yaml_cfg),
        settings=choice.settings,
        report_writer=functools.partial(  # the run folder and the folders its images came from
            _report_writer,
            roots=[cfg.images_root or str(Path(cfg.data).resolve().parent)]
            + ([str(Path(cfg.replay).resolve().parent)] if cfg.replay else []),
            allow_absolute=cfg.allow_absolute_paths,
        ),
        overwrite=args.overwrite,
        precheck=precheck,
        on_backend=on_backend,
    )
    print(f"ran {result.ran} question(s), {result.skipped} already done; predictions in {result.predictions_path}", file=sys.stderr)
    if result.metrics is not None:
        print(format_metrics(result.metrics))
        print(f"metrics: {result.out / 'metrics.json'}", file=sys.stderr)
        if result.report_path:
            print(f"report: {result.report_path}", file=sys.stderr)
    if result.ran == 0 and result.skipped == 0:
        print("warning: no question selected; nothing was evaluated", file=sys.stderr)
    if result.failed and not args.allow_failures:
        print(
            f"{result.failed} question(s) failed (see their 'error' in {result.predictions_path}; exit status 1, --allow-failures keeps 0)",
            file=sys.stderr,
        )
        return 1
    return 0
