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
from .entry import (
    HF_FLAGS,
    JUDGE_KEY_ENV,
    OPENAI_KEY_ENV,
    add_agent_flags,
    add_config_flag,
    add_hf_flags,
    add_sandbox_flags,
    agent_config,
    env_key,
    given_values,
    load_sections,
    sandbox_config,
)


#: Judge fields exposed as ``--judge-*`` flags; the key also from ``THYME_JUDGE_API_KEY``.
JUDGE_FLAGS = ("base_url", "model", "api_key", "response_format", "timeout_s", "max_retries")
#: EvalConfig fields exposed as flags (all of them).
EVAL_FLAGS = ("benchmark", "data", "images_root", "out", "limit", "concurrency", "num_shards", "shard", "schedule", "retry_failed", "report", "allow_absolute_paths")
#: OpenAIConfig fields exposed as flags for ``--base-url`` (pixel budget: the model group's flags).
OPENAI_FLAGS = ("continuation", "send_stop", "image_format", "timeout_s", "max_retries", "extra_body", "tokenizer")
#: Model flags that only the transformers backend reads (an error with ``--base-url``).
HF_ONLY_FLAGS = ("revision", "dtype", "device_map", "attn_implementation")


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
    from ..backends.openai import OpenAIConfig
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
    src.add_argument("--model", default=None, help="hub id or local checkpoint (transformers backend); with --base-url: the served model name")
    add_fields(src, OpenAIConfig, ("base_url",), help_prefix="with --model NAME: ")
    add_fields(src, OpenAIConfig, ("api_key",), help_prefix=f"for --base-url; else the model section's api_key, else ${OPENAI_KEY_ENV}: ")
    add_fields(src, EvalConfig, ("replay",))
    add_hf_flags(p, title="model (transformers backend; pixel budget also for --base-url; YAML section model)")
    add_fields(p.add_argument_group("OpenAI-compatible server (--base-url; YAML section model takes every field)"), OpenAIConfig, OPENAI_FLAGS, exclude=())
    add_agent_flags(p, ("max_new_tokens", "max_rounds", "temperature", "seed", "on_error", "shown_path", "ats"), title="agent (defaults: the reference's evaluation)")
    add_sandbox_flags(p)
    add_config_flag(p, "eval/agent/sandbox/model/judge")
    p.add_argument("--overwrite", action="store_true", help="start afresh in --out (its predictions, metrics and report are removed) instead of resuming")
    p.add_argument("--allow-failures", action="store_true", help="exit 0 even when questions failed (default: exit 1)")
    _add_judge_flags(p)

    sub = p.add_subparsers(dest="eval_command", title="sub-command", metavar="score")
    q = sub.add_parser("score", help="re-score saved predictions (no generation, no images)", description="Score a predictions JSONL (rows with question_id and prediction) against a benchmark file and print metrics.json's content.")
    q.add_argument("--benchmark", required=True, help="vstar, hrbench4k, hrbench8k, mme-realworld, mme-realworld-lite")
    q.add_argument("--data", required=True, help="the benchmark file the predictions answer")
    q.add_argument("--predictions", required=True, help="predictions.jsonl (question_id, prediction; error/tool_used/rounds used when present)")
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


def _model_kwargs(args: argparse.Namespace, yaml_cfg: dict[str, Any], *, openai: bool) -> dict[str, Any]:
    """The model section and the model flags given (flags win), checked against the backend's config.

    Raises:
        ThymeError: a key the backend does not know (named, with the known ones), or a
            transformers-only flag with ``--base-url``.
    """
    section = yaml_cfg.get("model")
    if not openai:
        from ..backends.hf import HFConfig

        return given_values(HFConfig, section, args, (*HF_FLAGS, "seed"), section_name="model")
    given = [f"--{k.replace('_', '-')}" for k in HF_ONLY_FLAGS if getattr(args, k, None) is not None]
    if given:
        raise ThymeError(f"{', '.join(given)} only apply to the transformers backend (--model without --base-url)", "the server loads the model; drop these flags")
    try:
        from ..backends.openai import OpenAIConfig
    except ImportError:  # the eval extra is missing: the factory says so
        return {k: v for k, v in {**(section or {}), "min_pixels": args.min_pixels, "max_pixels": args.max_pixels}.items() if v is not None}
    return given_values(OpenAIConfig, section, args, ("min_pixels", "max_pixels", *OPENAI_FLAGS), section_name="model")


def openai_backend_factory(base_url: str, model: str, *, api_key: str | None, concurrency: int, model_kw: dict[str, Any]):
    """A factory building :class:`thyme.backends.openai.OpenAIBackend` (imported lazily) with
    every setting of the model section and flags (``model_kw``, keys already checked)."""

    def build():
        try:
            from ..backends.openai import OpenAIBackend
        except ImportError as e:
            raise ThymeError(f"the OpenAI-compatible backend is not available ({e})", "install thyme with the eval extra: pip install 'thyme[eval]'") from e
        kw: dict[str, Any] = {"concurrency": concurrency, **model_kw}
        if api_key is not None:
            kw["api_key"] = api_key
        return OpenAIBackend(base_url, model, **{k: v for k, v in kw.items() if v is not None})

    return build


def hf_backend_factory(model: str, model_kw: dict[str, Any]):
    """A factory building :class:`thyme.backends.hf.HFBackend` (loads the model when called)."""

    def build():
        from ..backends.hf import HFBackend

        return HFBackend(model, **model_kw)

    return build


# --------------------------------------------------------------------------- commands


def _report_writer(items: list[dict[str, Any]], path: Path, *, title: str | None = None, roots: list[str] | None = None, allow_absolute: bool = False) -> Path:
    """The eval's report: embeds only images inside the run folder and the folders the run read
    its images from (``roots``; README: Paths in data)."""
    from ..report import write_report

    prov = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        prov = json.loads((path.parent / "metrics.json").read_text(encoding="utf-8")).get("provenance")
    return write_report(items, path, title=title, source=f"thyme eval {path.parent.resolve()}", provenance=prov, roots=[str(path.parent), *(roots or [])], allow_absolute=allow_absolute)


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
    from ..evaluate.runner import format_metrics, run_eval

    yaml_cfg = load_sections(args, {"eval", "agent", "sandbox", "model", "judge"})
    cfg = _eval_config(args, yaml_cfg)
    missing = [flag for flag, v in (("--benchmark", cfg.benchmark), ("--data", cfg.data), ("--out", cfg.out)) if not v]
    if missing:
        raise ThymeError(f"thyme eval needs {', '.join(missing)}", "thyme eval --benchmark NAME --data PATH (--model ID | --base-url URL --model NAME | --replay RECORDS) --out DIR")
    sources = [name for name, on in (("--replay", bool(cfg.replay)), ("--base-url", bool(args.base_url)), ("--model", bool(args.model) and not args.base_url)) if on]
    if len(sources) != 1:
        raise ThymeError(
            "say what answers the questions: exactly one of --model ID, --base-url URL --model NAME, or --replay RECORDS" + (f" (got {', '.join(sources)})" if sources else ""),
        )
    if args.base_url and not args.model:
        raise ThymeError("--base-url needs --model NAME (the model name the server serves)")
    from ..jsonl import ensure_writable

    ensure_writable(cfg.out, what="--out", folder=True)  # before any data is read or model loaded
    agent_cfg = agent_config(args, yaml_cfg)
    sandbox_cfg = sandbox_config(args, yaml_cfg)
    factory = None
    settings: dict[str, Any] = {}
    precheck = on_backend = None
    if args.base_url:
        model_kw = _model_kwargs(args, yaml_cfg, openai=True)
        api_key = args.api_key or model_kw.pop("api_key", None) or env_key(OPENAI_KEY_ENV)
        model_kw.pop("api_key", None)
        model_kw.pop("base_url", None)  # --base-url says where
        model_kw.pop("model", None)  # --model says which
        concurrency = model_kw.pop("concurrency", None) or cfg.concurrency
        factory = openai_backend_factory(args.base_url, args.model, api_key=api_key, concurrency=concurrency, model_kw=model_kw)
        settings = {"base_url": args.base_url, "served_model": args.model, "model_flags": model_kw, "backend": "openai", "model": args.model}
    elif args.model:
        model_kw = _model_kwargs(args, yaml_cfg, openai=False)
        from ..agent.preflight import check_images_decode, check_prompt_fits

        factory = hf_backend_factory(args.model, model_kw)
        settings = {"model_flags": model_kw, "backend": "hf", "model": args.model}

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
        settings=settings,
        report_writer=functools.partial(  # the run folder and the folders its images came from
            _report_writer,
            roots=[cfg.images_root or str(Path(cfg.data).resolve().parent)] + ([str(Path(cfg.replay).resolve().parent)] if cfg.replay else []),
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
        print(f"{result.failed} question(s) failed (see their 'error' in {result.predictions_path}; exit status 1, --allow-failures keeps 0)", file=sys.stderr)
        return 1
    return 0
