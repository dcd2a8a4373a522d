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
import dataclasses
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ThymeError


def _add_judge_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judge (only for answers no rule can read; off unless --judge-base-url is given)")
    g.add_argument("--judge-base-url", default=None, help="OpenAI-compatible server of the judge, e.g. http://127.0.0.1:8001/v1")
    g.add_argument("--judge-model", default=None, help="served model name of the judge")
    g.add_argument("--judge-api-key", default=None, help="bearer key for the judge server")
    g.add_argument("--judge-response-format", default=None, choices=["json_schema", "json_object", "none"], help="how the JSON reply is constrained (default json_schema)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``eval`` (with its ``score`` sub-command) on the ``thyme`` sub-parsers."""
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
    p.add_argument("--benchmark", default=None, help="vstar, hrbench4k, hrbench8k, mme-realworld, mme-realworld-lite")
    p.add_argument("--data", default=None, help="benchmark file: VLMEvalKit .tsv, official .json/.jsonl/.parquet, or the corpus's normalised .jsonl")
    p.add_argument("--images-root", default=None, help="folder the data's relative image names start from (default: the data file's folder)")
    src = p.add_argument_group("what answers (one of)")
    src.add_argument("--model", default=None, help="hub id or local checkpoint (transformers backend); with --base-url: the served model name")
    src.add_argument("--base-url", default=None, help="OpenAI-compatible server (vLLM, SGLang...), e.g. http://127.0.0.1:8000/v1")
    src.add_argument("--api-key", default=None, help="bearer key for --base-url")
    src.add_argument("--replay", default=None, help="Thyme records (JSONL with response, benchmark, question_id) to play back")
    p.add_argument("--out", default=None, help="output folder (predictions.jsonl, metrics.json, report.html); reuse it to resume")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only (after the --replay join)")
    p.add_argument("--concurrency", type=int, default=None, help="trajectories in flight at once (default 8)")
    p.add_argument("--num-shards", type=int, default=None, help="processes sharing the run (one per GPU); each gets --shard I")
    p.add_argument("--shard", type=int, default=None, help="this process's shard, 0 <= I < N")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument("--no-retry-failed", action="store_true", help="on resume, keep earlier failed questions instead of running them again")
    p.add_argument("--overwrite", action="store_true", help="start afresh in --out (its predictions, metrics and report are removed) instead of resuming")
    p.add_argument("--allow-failures", action="store_true", help="exit 0 even when questions failed (default: exit 1)")
    m = p.add_argument_group("model (transformers backend; pixel budget also for --base-url)")
    m.add_argument("--revision", default=None)
    m.add_argument("--dtype", default=None, help="auto, bfloat16, float16, float32")
    m.add_argument("--device-map", default=None)
    m.add_argument("--attn-implementation", default=None)
    m.add_argument("--min-pixels", type=int, default=None, help="per-image pixel budget, lower bound (default: the processor's)")
    m.add_argument("--max-pixels", type=int, default=None, help="per-image pixel budget, upper bound (default: the processor's)")
    a = p.add_argument_group("agent (defaults: the reference's evaluation)")
    a.add_argument("--max-new-tokens", type=int, default=None, help="tokens per round (2048)")
    a.add_argument("--max-rounds", type=int, default=None, help="generation rounds (5)")
    a.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    a.add_argument("--seed", type=int, default=None)
    a.add_argument("--on-error", choices=["show", "regenerate"], default=None, help="show failed code's error to the model (default) or regenerate (the reference's evaluation)")
    a.add_argument("--shown-path", default=None, help="image path shown to the model ({name}, {path}; default the real path)")
    s = p.add_argument_group("sandbox")
    s.add_argument("--timeout", type=float, default=None, help="seconds per code execution (10)")
    s.add_argument("--min-crop-side", type=int, default=None, help="grow crops below this many pixels (64; 0 disables)")
    p.add_argument("--config", default=None, help="YAML with sections eval/agent/sandbox/model/judge (flags override it)")
    _add_judge_flags(p)

    sub = p.add_subparsers(dest="eval_command", title="sub-command", metavar="score")
    q = sub.add_parser("score", help="re-score saved predictions (no generation, no images)", description="Score a predictions JSONL (rows with question_id and prediction) against a benchmark file and print metrics.json's content.")
    q.add_argument("--benchmark", required=True, help="vstar, hrbench4k, hrbench8k, mme-realworld, mme-realworld-lite")
    q.add_argument("--data", required=True, help="the benchmark file the predictions answer")
    q.add_argument("--predictions", required=True, help="predictions.jsonl (question_id, prediction; error/tool_used/rounds used when present)")
    q.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    q.add_argument("--images-root", default=None, help=argparse.SUPPRESS)
    q.add_argument("--out", default=None, help="also write the metrics JSON to this file")
    q.add_argument("--config", default=None, help="YAML with a judge section")
    _add_judge_flags(q)
    return p


# --------------------------------------------------------------------------- config


def _yaml(args: argparse.Namespace, sections: set[str]) -> dict[str, Any]:
    from ..config import check_sections, load_yaml

    data = load_yaml(getattr(args, "config", None))
    check_sections(data, sections, str(args.config))
    return data


def _judge(args: argparse.Namespace, yaml_cfg: dict[str, Any]) -> Any:
    from ..config import merge
    from ..scoring.judge import JudgeClient, JudgeConfig

    cfg = merge(JudgeConfig(), yaml_cfg.get("judge"), source="config section 'judge'")
    cfg = merge(
        cfg,
        {"base_url": args.judge_base_url, "model": args.judge_model, "api_key": args.judge_api_key, "response_format": args.judge_response_format},
        source="flags",
    )
    if not cfg.base_url:
        return None
    return JudgeClient(cfg)


def _eval_config(args: argparse.Namespace, yaml_cfg: dict[str, Any]):
    from ..config import merge
    from ..evaluate.runner import EvalConfig

    cfg = merge(EvalConfig(), yaml_cfg.get("eval"), source="config section 'eval'")
    flags = {
        "benchmark": args.benchmark,
        "data": args.data,
        "out": args.out,
        "images_root": args.images_root,
        "replay": args.replay,
        "limit": args.limit,
        "concurrency": args.concurrency,
        "num_shards": args.num_shards,
        "shard": args.shard,
        "retry_failed": False if args.no_retry_failed else None,
        "report": False if args.no_report else None,
    }
    return merge(cfg, flags, source="flags")


def _agent_config(args: argparse.Namespace, yaml_cfg: dict[str, Any]):
    from ..agent import AgentConfig
    from ..config import merge

    cfg = merge(AgentConfig(), yaml_cfg.get("agent"), source="config section 'agent'")
    flags = {k: getattr(args, k) for k in ("max_new_tokens", "max_rounds", "temperature", "seed", "on_error", "shown_path")}
    return merge(cfg, flags, source="flags")


def _sandbox_config(args: argparse.Namespace, yaml_cfg: dict[str, Any]):
    from ..config import merge
    from ..sandbox import SandboxConfig

    cfg = merge(SandboxConfig(), yaml_cfg.get("sandbox"), source="config section 'sandbox'")
    return merge(cfg, {"timeout_s": args.timeout, "min_crop_side": args.min_crop_side}, source="flags")


def _model_kwargs(args: argparse.Namespace, yaml_cfg: dict[str, Any]) -> dict[str, Any]:
    kw = dict(yaml_cfg.get("model") or {})
    for k in ("revision", "dtype", "device_map", "attn_implementation", "min_pixels", "max_pixels", "seed"):
        v = getattr(args, k, None)
        if v is not None:
            kw[k] = v
    return kw


def openai_backend_factory(base_url: str, model: str, *, api_key: str | None, concurrency: int, model_kw: dict[str, Any]):
    """A factory building :class:`thyme.backends.openai.OpenAIBackend` (imported lazily); only
    the keyword arguments its constructor accepts are passed."""

    def build():
        try:
            from ..backends.openai import OpenAIBackend
        except ImportError as e:
            raise ThymeError(f"the OpenAI-compatible backend is not available ({e})", "install thyme with the eval extra: pip install 'thyme[eval]'") from e
        kw: dict[str, Any] = {"api_key": api_key, "concurrency": concurrency, **{k: v for k, v in model_kw.items() if k in ("min_pixels", "max_pixels")}}
        accepted = set(inspect.signature(OpenAIBackend).parameters)
        try:  # keyword overrides of its config dataclass
            from ..backends.openai import OpenAIConfig

            accepted |= {f.name for f in dataclasses.fields(OpenAIConfig)}
        except (ImportError, TypeError):
            pass
        return OpenAIBackend(base_url, model, **{k: v for k, v in kw.items() if v is not None and k in accepted})

    return build


def hf_backend_factory(model: str, model_kw: dict[str, Any]):
    """A factory building :class:`thyme.backends.hf.HFBackend` (loads the model when called)."""

    def build():
        from ..backends.hf import HFBackend

        return HFBackend(model, **model_kw)

    return build


# --------------------------------------------------------------------------- commands


def _report_writer(items: list[dict[str, Any]], path: Path, *, title: str | None = None) -> Path:
    from ..report import write_report

    prov = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        prov = json.loads((path.parent / "metrics.json").read_text(encoding="utf-8")).get("provenance")
    return write_report(items, path, title=title, source=f"thyme eval {path.parent.resolve()}", provenance=prov)


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

    yaml_cfg = _yaml(args, {"judge"})
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

    yaml_cfg = _yaml(args, {"eval", "agent", "sandbox", "model", "judge"})
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
    model_kw = _model_kwargs(args, yaml_cfg)
    agent_cfg = _agent_config(args, yaml_cfg)
    sandbox_cfg = _sandbox_config(args, yaml_cfg)
    factory = None
    settings: dict[str, Any] = {}
    precheck = on_backend = None
    if args.base_url:
        factory = openai_backend_factory(args.base_url, args.model, api_key=args.api_key, concurrency=cfg.concurrency, model_kw=model_kw)
        settings = {"base_url": args.base_url, "served_model": args.model, "model_flags": model_kw, "backend": "openai", "model": args.model}
    elif args.model:
        from ..agent.preflight import check_images_decode, check_prompt_fits

        factory = hf_backend_factory(args.model, model_kw)
        settings = {"model_flags": model_kw, "backend": "hf", "model": args.model}

        def precheck(rows: list[Any]) -> None:  # before the model loads
            check_images_decode([r.image for r in rows if r.image])

        def on_backend(backend: Any, rows: list[Any]) -> None:  # before generating
            from ..evaluate.prompts import build_question

            check_prompt_fits(backend, [(r.key, build_question(r), [r.image] if r.image else []) for r in rows], agent_cfg)

    result = run_eval(
        cfg,
        agent_config=agent_cfg,
        sandbox_config=sandbox_cfg,
        backend_factory=factory,
        judge=_judge(args, yaml_cfg),
        settings=settings,
        report_writer=_report_writer,
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
