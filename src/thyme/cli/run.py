"""``thyme run``: answer a question about an image with a model (hf backend), streaming the trajectory."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .entry import add_config_flag, add_sandbox_flags, agent_config, load_sections, sandbox_config


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``thyme run`` on the ``thyme`` sub-command parser; returns the new parser."""
    p = subparsers.add_parser("run", help="answer a question about an image with a model")
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
    add_sandbox_flags(p)
    add_config_flag(p)

    return p


def run(args: argparse.Namespace) -> int:
    from ..agent import Agent
    from ..agent.preflight import check_images_decode, check_prompt_fits
    from ..jsonl import ensure_writable
    from ..sandbox import Sandbox

    yaml_cfg = load_sections(args, {"agent", "sandbox", "model"})
    # everything that can be wrong with the input is found before the model loads
    if args.out:
        ensure_writable(args.out, what="--out")  # a finished trajectory is never thrown away
    check_images_decode(args.image)  # missing, unreadable, truncated: exit 2
    agent_cfg = agent_config(args, yaml_cfg)
    model_kw = dict(yaml_cfg.get("model") or {})
    for k in ("revision", "dtype", "device_map", "attn_implementation", "min_pixels", "max_pixels", "seed"):
        v = getattr(args, k)
        if v is not None:
            model_kw[k] = v
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
        from ..backends.hf import HFBackend

        if not args.quiet:
            print(f"loading {args.model} ...", file=sys.stderr)
        backend = HFBackend(args.model, **model_kw)
        with backend, Agent(backend, sandbox, agent_cfg) as agent:
            check_prompt_fits(backend, [("the question", args.question, images)], agent_cfg)
            if agent_cfg.prefill and not args.quiet:
                sys.stdout.write(agent_cfg.prefill)
            traj = agent.run(args.question, images, on_event=on_event)
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
