"""``thyme run``: answer a question about an image with a model, streaming the trajectory.

The model is a checkpoint loaded here (``--model ID``, the ``hf`` backend) or one served by a
vLLM / SGLang / OpenAI-compatible server (``--base-url URL --model NAME``, the ``openai``
backend, with the same flags and ``model:`` section as ``thyme eval --base-url``); the kind is
chosen by :func:`thyme.cli.backend.choose_backend` and built by the registry
(:func:`thyme.rollout.registry.build_backend`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import ThymeError
from .backend import add_server_flags, choose_backend
from .entry import (
    add_agent_flags,
    add_config_flag,
    add_hf_flags,
    add_sandbox_flags,
    agent_config,
    int_at_least,
    load_sections,
    missing_folders,
    remove_empty_folders,
    sandbox_config,
)

#: The backends ``run`` offers, in the order its messages list them (:mod:`thyme.rollout.registry`).
RUN_BACKENDS = ("hf", "openai")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``thyme run`` on the ``thyme`` sub-command parser; returns the new parser."""
    p = subparsers.add_parser("run", help="answer a question about an image with a model")
    p.add_argument("--image", required=True, action="append", help="input image (repeatable; the first is the one the prompt describes)")
    p.add_argument("--question", required=True, help="the question (include options for multiple choice)")
    p.add_argument(
        "--model", required=True, help="hub id (e.g. Kwai-Keye/Thyme-RL) or local checkpoint folder; with --base-url: the served model name"
    )
    p.add_argument("--out", default=None, help="write the trajectory JSON here, its images in a folder beside it")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the trajectory --out holds (its old images are removed; otherwise refused)"
    )
    p.add_argument("--quiet", action="store_true", help="print only the answer")
    add_agent_flags(p)
    add_hf_flags(p, title="model (transformers backend; pixel budget also for --base-url; YAML section model)")
    add_server_flags(p)
    p.add_argument(
        "--num-samples",
        type=int_at_least(1),
        default=1,
        help="trajectories of this question (sample i uses seed + i); --out keeps them all as OUT-i.json",
    )
    add_sandbox_flags(p)
    add_config_flag(p)

    return p


def out_paths(out: str, n: int) -> list[Path]:
    """The trajectory files ``--out OUT`` names for ``n`` samples (``OUT``, or ``OUT-i.json``)."""
    p = Path(out)
    return [p] if n <= 1 else [p.with_name(f"{p.stem}-{i}{p.suffix or '.json'}") for i in range(n)]


def images_dir(path: Path) -> Path:
    """The folder :meth:`thyme.agent.Trajectory.save` copies a trajectory's images into."""
    return path.with_name(path.stem + "_images")


def check_out(out: str, n: int, overwrite: bool) -> None:
    """Refuse to replace trajectories (or their images folders) ``--out`` already holds unless
    ``--overwrite``: a finished trajectory is never thrown away silently, and a new one never
    shares a folder with the old one's images.

    Raises:
        ThymeError: naming what is there, ``--overwrite`` and a new ``--out``.
    """
    found = [str(q) for p in out_paths(out, n) for q in (p, images_dir(p)) if q.exists()]
    if found and not overwrite:
        raise ThymeError(
            f"--out {out} would replace {', '.join(found[:4])}{' ...' if len(found) > 4 else ''}",
            "pass a new --out, or --overwrite to replace it (its old images are removed)",
        )


def save(traj: Any, path: Path) -> None:
    """Write ``traj`` to ``path`` with its images, the images folder of an earlier trajectory
    there removed first (``--overwrite``: no orphans, no ``-1`` copies beside the new images)."""
    import shutil

    old = images_dir(path)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    elif old.is_symlink() or old.is_file():
        old.unlink()
    traj.save(path)


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``thyme run``; folders it created for ``--out`` are removed again when it
    fails before writing anything."""
    created = missing_folders(args.out) if args.out else []
    try:
        return _run(args)
    except BaseException:
        remove_empty_folders(created)
        raise


def _run(args: argparse.Namespace) -> int:
    from ..agent import Agent
    from ..agent.preflight import check_images_decode, check_prompt_fits
    from ..jsonl import ensure_writable
    from ..sandbox import Sandbox

    yaml_cfg = load_sections(args, {"agent", "sandbox", "model"})
    # everything that can be wrong with the input is found before the model loads
    if args.out:
        check_out(args.out, args.num_samples, args.overwrite)  # a finished trajectory is never thrown away silently
        ensure_writable(args.out, what="--out")
    agent_cfg = agent_config(args, yaml_cfg)  # values that make no sense: exit 2
    if args.num_samples > 1 and agent_cfg.temperature == 0:
        print(
            f"warning: --num-samples {args.num_samples} with greedy decoding (temperature 0) gives {args.num_samples} identical samples;"
            " pass --temperature (e.g. 0.7) to sample",
            file=sys.stderr,
        )
    check_images_decode(args.image)  # missing, unreadable, truncated: exit 2
    choice = choose_backend(args, yaml_cfg, kinds=RUN_BACKENDS)  # unknown settings stop us before loading
    images = [os.path.abspath(p) for p in args.image]

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

    # the sandbox first: layers its config requires but this host lacks stop us before the model loads
    with Sandbox(sandbox_config(args, yaml_cfg)) as sandbox:
        if not args.quiet:
            print(f"loading {args.model} ..." if choice.local else f"using {args.model} at {args.base_url} ...", file=sys.stderr)
        backend = choice.factory()()
        with backend, Agent(backend, sandbox, agent_cfg) as agent:
            check_server = getattr(backend, "check_server", None)
            if callable(check_server):  # down, mistyped URL, wrong model name: one clear error
                if agent_cfg.ats and agent_cfg.temperature > 0 and getattr(backend.capabilities, "ats", False):
                    check_server(ats=True)  # and that the server applies ATS (openai: thyme's vLLM logits processor)
                else:
                    check_server()
            if choice.local:
                check_prompt_fits(backend, [("the question", args.question, images)], agent_cfg)
            if agent_cfg.prefill and not args.quiet:
                sys.stdout.write(agent_cfg.prefill)
            n = max(1, int(getattr(args, "num_samples", 1) or 1))
            if n > 1:
                return _run_samples(args, agent, backend, n)
            traj = agent.run(args.question, images, on_event=on_event)
            traj.meta["model"] = backend.describe()
            if args.out:
                save(traj, Path(args.out))
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
    from ..agent import Task

    images = [os.path.abspath(p) for p in args.image]
    trajs = agent.run_batch([Task(args.question, images, id=f"sample-{i}") for i in range(n)])
    status = 0
    for i, traj in enumerate(trajs):
        traj.meta["model"] = backend.describe()
        traj.meta["sample"] = i
        if args.out:
            save(traj, out_paths(args.out, n)[i])
        if traj.stop_reason == "error":
            print(f"sample {i}: error: {traj.error}", file=sys.stderr)
            status = 1
        print(f"answer[{i}]: {traj.answer}" if traj.answer is not None else f"answer[{i}]: (none)")
    return status
