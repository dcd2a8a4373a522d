"""``thyme dev``: developer tools (tiny random checkpoints, the OpenAI-compatible test servers).

Everything here runs code of :mod:`thyme.testing`, imported only when a ``dev`` command runs.
"""

from __future__ import annotations

import argparse
import time
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``thyme dev`` on the ``thyme`` sub-command parser; returns the new parser."""
    p = subparsers.add_parser("dev", help="developer tools: tiny checkpoints, test servers")
    dsub = p.add_subparsers(dest="dev_command", required=True)
    q = dsub.add_parser("tiny-checkpoint", help="write a tiny random checkpoint of a real architecture (smoke tests)")
    q.add_argument("dir")
    q.add_argument("--arch", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
    q.add_argument("--seed", type=int, default=0)
    q.add_argument(
        "--head-dim",
        type=int,
        default=16,
        choices=[16, 32],
        help="text attention head size: 32 for vLLM's CPU build (its attention refuses 16); 16 is the test suite's",
    )

    s = dsub.add_parser("serve", help="our vLLM-compatible test server over the hf backend (loopback only)")
    s.add_argument("model", help="checkpoint folder or hub id")
    s.add_argument("--host", default="127.0.0.1", help="a loopback address (127.0.0.1, ::1, localhost); others are refused")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (see --port-file)")
    s.add_argument("--port-file", default=None, help="write the bound port here once listening")
    s.add_argument("--served-model-name", default=None, help="the model name requests use (default: MODEL)")
    s.add_argument("--max-batch", type=int, default=8)
    s.add_argument("--batch-wait-ms", type=float, default=10.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    d = dsub.add_parser("teacher", help="the scripted teacher of `thyme data synthesize` (OpenAI-compatible, loopback only, with faults)")
    d.add_argument("--host", default="127.0.0.1", help="a loopback address (127.0.0.1, ::1, localhost); others are refused")
    d.add_argument("--port", type=int, default=8000, help="0 picks a free port (see --port-file)")
    d.add_argument("--port-file", default=None, help="write the bound port here once listening")
    d.add_argument(
        "--fault-rate",
        action="append",
        default=[],
        metavar="KIND=P",
        help="inject fault KIND (syntax, leak, crash, wrong_box, wrong_answer, inconsistent, bad_verdict, "
        "http_error, hang) in a share P of rows",
    )
    d.add_argument("--seed", type=int, default=0, help="seed of the fault draws")
    d.add_argument("--hang-s", type=float, default=3600.0, help="how long a 'hang' fault holds the reply, seconds")

    t = dsub.add_parser("transformers-serve", help="`transformers serve` on loopback (works without torchvision)")
    t.add_argument("model")
    t.add_argument("--host", default="127.0.0.1", help="a loopback address (127.0.0.1, ::1, localhost); others are refused")
    t.add_argument("--port", type=int, default=8000)
    t.add_argument("extra", nargs=argparse.REMAINDER, help="further arguments for `transformers serve`")
    return p


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``thyme dev ...`` command; returns the exit status."""
    if args.dev_command == "tiny-checkpoint":
        from ..testing.tiny_checkpoint import write_tiny_checkpoint

        t0 = time.perf_counter()
        path = write_tiny_checkpoint(args.dir, arch=args.arch, seed=args.seed, head_dim=args.head_dim)
        print(f"wrote tiny {args.arch} checkpoint to {path} ({time.perf_counter() - t0:.1f} s)")
        return 0
    if args.dev_command == "teacher":
        from ..testing import teacher

        try:
            rates = teacher.parse_fault_rates(args.fault_rate)
        except ValueError as e:
            raise SystemExit(f"thyme dev teacher: {e}") from None
        teacher.serve(host=args.host, port=args.port, port_file=args.port_file, fault_rates=rates, seed=args.seed, hang_s=args.hang_s)
        return 0
    from ..testing import openai_server

    if args.dev_command == "serve":
        openai_server.serve(
            args.model,
            host=args.host,
            port=args.port,
            port_file=args.port_file,
            served_model_name=args.served_model_name,
            max_batch=args.max_batch,
            batch_wait_ms=args.batch_wait_ms,
            seed=args.seed,
            threads=args.threads,
        )
    else:
        openai_server.run_transformers_serve(args.model, host=args.host, port=args.port, extra=list(args.extra or []))
    return 0
