"""The ``thyme`` command: thin argument parsing over the modules' configs.

Commands: ``run``, ``replay``, ``sandbox exec``, ``sandbox doctor``, ``dev tiny-checkpoint``.
Errors in the user's input (:class:`thyme.errors.ThymeError`) print one clear message and
exit with status 2; other failures exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import ThymeError


def _add_sandbox_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sandbox")
    g.add_argument("--timeout", type=float, default=None, help="wall-clock seconds per code execution (default 10)")
    g.add_argument("--min-crop-side", type=int, default=None, help="grow crops below this many pixels per side (reference: 64; 0 disables)")


def _add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML file with sections agent/sandbox/model (flags override it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thyme", description="Thyme: think beyond images. A VLM that reasons with code run in a sandbox.")
    sub = parser.add_subparsers(dest="command", required=True)

    # ---- run
    p = sub.add_parser("run", help="answer a question about an image with a model")
    p.add_argument("--image", required=True, action="append", help="input image (repeatable; the first is the one the prompt describes)")
    p.add_argument("--question", required=True, help="the question (include options for multiple choice)")
    p.add_argument("--model", required=True, help="hub id (e.g. Kwai-Keye/Thyme-RL) or local checkpoint folder")
    p.add_argument("--revision", default=None, help="model revision (branch, tag or commit)")
    p.add_argument("--out", default=None, help="write the trajectory JSON here, its images in a folder beside it")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens per generation round (default 2048)")
    p.add_argument("--max-rounds", type=int, default=None, help="generation rounds (default 5)")
    p.add_argument("--min-pixels", type=int, default=None, help="per-image pixel budget, lower bound (default: the processor's)")
    p.add_argument("--max-pixels", type=int, default=None, help="per-image pixel budget, upper bound (default: the processor's)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default, as the reference evaluates)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    p.add_argument("--device-map", default=None, help="e.g. auto, cuda:0, cpu")
    p.add_argument("--attn-implementation", default=None, help="e.g. sdpa, flash_attention_2, eager")
    p.add_argument("--on-error", choices=["show", "regenerate"], default=None, help="show failed code's error to the model (default) or regenerate")
    p.add_argument("--shown-path", default=None, help="image path shown to the model ({name}, {path} allowed; default: the real path)")
    p.add_argument("--prefill", default=None, help="text the assistant message starts with (a code segment ending in </code> is run first)")
    p.add_argument("--quiet", action="store_true", help="print only the answer")
    p.add_argument("--ats", action="store_true", default=None, help="GRPO-ATS decoding: greedy inside <code> blocks, --temperature elsewhere")
    p.add_argument("--num-samples", type=int, default=1, help="trajectories of this question (sample i uses seed + i); --out keeps them all as OUT-i.json")
    _add_sandbox_flags(p)
    _add_config_flag(p)

    # ---- replay
    p = sub.add_parser("replay", help="re-execute recorded Thyme trajectories in the sandbox")
    p.add_argument("records", help="JSONL of Thyme records (image, question, response)")
    p.add_argument("--images-root", default=None, help="folder the records' relative image paths start from (default: the records file's folder)")
    p.add_argument("--out", default=None, help="results JSONL, written as records finish; rerun to resume")
    p.add_argument("--json", action="store_true", help="print the totals as one JSON line at the end")
    p.add_argument("--batch-size", type=int, default=8, help="records replayed together")
    _add_sandbox_flags(p)
    _add_config_flag(p)

    # ---- sandbox
    p = sub.add_parser("sandbox", help="the code sandbox")
    ssub = p.add_subparsers(dest="sandbox_command", required=True)
    q = ssub.add_parser("exec", help="run one code file against an image")
    q.add_argument("--image", action="append", default=[], help="input image (repeatable)")
    q.add_argument("--code", required=True, help="Python file to run ('-' reads standard input)")
    q.add_argument("--out-dir", default=None, help="copy produced images here (default: a new folder under the current one)")
    q.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _add_sandbox_flags(q)
    ssub.add_parser("doctor", help="which confinement layers are active, what model code may import")

    # ---- dev
    p = sub.add_parser("dev", help="developer tools")
    dsub = p.add_subparsers(dest="dev_command", required=True)
    q = dsub.add_parser("tiny-checkpoint", help="write a tiny random checkpoint of a real architecture (smoke tests)")
    q.add_argument("dir")
    q.add_argument("--arch", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
    q.add_argument("--seed", type=int, default=0)

    # ---- commands that live with their modules (each imports its heavy parts lazily)
    for module in _command_modules().values():
        module.add_parser(sub)
    return parser


def _command_modules() -> dict[str, Any]:
    """Commands implemented next to their modules: ``{command: module with add_parser/run}``."""
    from . import report_commands
    from .data import commands as data_commands
    from .evaluate import commands as eval_commands
    from .train import commands as train_commands

    return {"eval": eval_commands, "report": report_commands, "data": data_commands, "train": train_commands}


# --------------------------------------------------------------------------- helpers


def _sandbox_config(args: argparse.Namespace, yaml_cfg: dict[str, Any]):
    from .config import merge
    from .sandbox import SandboxConfig

    cfg = merge(SandboxConfig(), yaml_cfg.get("sandbox"), source="config section 'sandbox'")
    return merge(cfg, {"timeout_s": args.timeout, "min_crop_side": args.min_crop_side}, source="flags")


def _agent_config(args: argparse.Namespace, yaml_cfg: dict[str, Any]):
    from .agent import AgentConfig
    from .config import merge

    cfg = merge(AgentConfig(), yaml_cfg.get("agent"), source="config section 'agent'")
    flags = {
        k: getattr(args, a, None)
        for k, a in [
            ("max_new_tokens", "max_new_tokens"),
            ("max_rounds", "max_rounds"),
            ("temperature", "temperature"),
            ("seed", "seed"),
            ("on_error", "on_error"),
            ("shown_path", "shown_path"),
            ("prefill", "prefill"),
            ("ats", "ats"),
        ]
    }
    return merge(cfg, flags, source="flags")


def _load_config(args: argparse.Namespace, sections: set[str]) -> dict[str, Any]:
    from .config import check_sections, load_yaml

    data = load_yaml(getattr(args, "config", None))
    check_sections(data, sections, str(args.config))
    return data


# --------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    from .agent import Agent
    from .backends.hf import HFBackend
    from .imageio import image_size
    from .sandbox import Sandbox

    yaml_cfg = _load_config(args, {"agent", "sandbox", "model"})
    for img in args.image:
        image_size(img)  # fail fast with a clear message before loading a model
    agent_cfg = _agent_config(args, yaml_cfg)
    model_kw = dict(yaml_cfg.get("model") or {})
    for k in ("revision", "dtype", "device_map", "attn_implementation", "min_pixels", "max_pixels", "seed"):
        v = getattr(args, k)
        if v is not None:
            model_kw[k] = v
    if not args.quiet:
        print(f"loading {args.model} ...", file=sys.stderr)
    backend = HFBackend(args.model, **model_kw)

    def on_event(i: int, kind: str, payload: Any) -> None:
        if args.quiet:
            return
        if kind == "text":
            sys.stdout.write(payload)
            sys.stdout.flush()
        elif kind == "feedback":
            shown = "".join(p["text"] if p["type"] == "text" else f"[image {p['image']}]" for p in payload)
            sys.stdout.write(shown)
            sys.stdout.flush()

    with backend, Sandbox(_sandbox_config(args, yaml_cfg)) as sandbox, Agent(backend, sandbox, agent_cfg) as agent:
        if agent_cfg.prefill and not args.quiet:
            sys.stdout.write(agent_cfg.prefill)
        n = max(1, int(getattr(args, "num_samples", 1) or 1))
        if n > 1:
            return _run_samples(args, agent, backend, n)
        traj = agent.run(args.question, [os.path.abspath(p) for p in args.image], on_event=on_event)
        traj.meta["model"] = backend.describe()
        if args.out:
            traj.save(args.out)
    if not args.quiet:
        print()
        print(f"--- stop: {traj.stop_reason}; rounds: {len(traj.turns)}; code blocks: {traj.code_blocks}", file=sys.stderr)
        if args.out:
            print(f"--- trajectory written to {args.out}", file=sys.stderr)
    if traj.stop_reason == "error":
        print(f"error: {traj.error}", file=sys.stderr)
        return 1
    print(f"answer: {traj.answer}" if traj.answer is not None else "answer: (none)")
    return 0


def _run_samples(args: argparse.Namespace, agent: Any, backend: Any, n: int) -> int:
    """``thyme run --num-samples N``: N trajectories of one question in one batch (pass@k,
    best-of-N); ``--out X.json`` writes ``X-0.json`` ... ``X-{N-1}.json``; one answer line each."""
    from .agent import Task

    images = [os.path.abspath(p) for p in args.image]
    trajs = agent.run_batch([Task(args.question, images, id=f"sample-{i}") for i in range(n)])
    status = 0
    for i, traj in enumerate(trajs):
        traj.meta["model"] = backend.describe()
        traj.meta["sample"] = i
        if args.out:
            out = Path(args.out)
            traj.save(out.with_name(f"{out.stem}-{i}{out.suffix or '.json'}"))
        if traj.stop_reason == "error":
            print(f"sample {i}: error: {traj.error}", file=sys.stderr)
            status = 1
        print(f"answer[{i}]: {traj.answer}" if traj.answer is not None else f"answer[{i}]: (none)")
    return status


def cmd_replay(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .replay import count_records, format_row, replay
    from .sandbox import Sandbox

    yaml_cfg = _load_config(args, {"agent", "sandbox"})
    records = Path(args.records)
    if not records.is_file():
        raise ThymeError(f"records file not found: {records}", "pass a JSONL file of Thyme records")
    images_root = args.images_root if args.images_root is not None else str(records.parent)
    if not Path(images_root).is_dir():
        raise ThymeError(f"--images-root is not a folder: {images_root}")
    total = count_records(records)
    bar = tqdm(total=total, desc="replay", unit="record", file=sys.stderr, disable=None)
    last = [0]

    def progress(n: int) -> None:
        bar.update(n - last[0])
        last[0] = n

    with Sandbox(_sandbox_config(args, yaml_cfg)) as sandbox:
        summary = replay(
            records,
            sandbox=sandbox,
            images_root=images_root,
            out_path=args.out,
            config=_agent_config(args, yaml_cfg),
            batch_size=args.batch_size,
            progress=progress,
            on_row=None if args.json else (lambda row: bar.write(format_row(row), file=sys.stdout)),
        )
    bar.close()
    d = summary.to_dict()
    if not args.json:
        for k, v in d.items():
            if k != "failures":
                print(f"{k:>14}: {v}")
        if args.out:
            print(f"results written to {args.out}")
    else:
        print(json.dumps(d, ensure_ascii=False))
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from . import sandbox as sb

    if args.sandbox_command == "doctor":
        print(sb.format_doctor(sb.doctor()))
        return 0
    code_path = args.code
    if code_path != "-" and not Path(code_path).is_file():
        raise ThymeError(f"code file not found: {code_path}")
    from .imageio import image_size

    for img in args.image:
        image_size(img)
    cfg = _sandbox_config(args, {})
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


def cmd_dev(args: argparse.Namespace) -> int:
    from .dev.tiny_checkpoint import write_tiny_checkpoint

    path = write_tiny_checkpoint(args.dir, arch=args.arch, seed=args.seed)
    print(f"wrote tiny {args.arch} checkpoint to {path}")
    return 0


COMMANDS = {"run": cmd_run, "replay": cmd_replay, "sandbox": cmd_sandbox, "dev": cmd_dev}


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in COMMANDS:
        return COMMANDS[args.command](args)
    return _command_modules()[args.command].run(args)


def _guarded(fn: Any, args: argparse.Namespace) -> int:
    """Run a command: bad input prints one clear message (status 2), Ctrl-C status 130."""
    try:
        return fn(args)
    except ThymeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return _guarded(_dispatch, build_parser().parse_args(argv))


def standalone(module: Any, command: str, argv: list[str] | None = None) -> int:
    """Entry of ``python -m thyme.<package>.commands ...`` (what ``accelerate launch -m`` runs).

    Parses exactly as ``thyme COMMAND ...``; the leading ``COMMAND`` may be left out.
    """
    parser = argparse.ArgumentParser(prog="thyme")
    module.add_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != command:
        argv = [command, *argv]
    return _guarded(module.run, parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
