"""The ``thyme`` command: thin argument parsing over the configs of the modules below.

One module per command group, each with ``add_parser(subparsers)`` and ``run(args)``:

=========  ============================================================================
``run``     :mod:`thyme.cli.run`      answer a question about an image with a model
``replay``  :mod:`thyme.cli.replay`   re-execute recorded trajectories in the sandbox
``sandbox`` :mod:`thyme.cli.sandbox`  ``exec`` one code file, ``doctor``
``eval``    :mod:`thyme.cli.eval`     benchmarks; ``eval score`` rescoring
``data``    :mod:`thyme.cli.data`     ``convert``, ``verify``, ``show-masks``
``train``   :mod:`thyme.cli.train`    ``sft``
``report``  :mod:`thyme.cli.report`   the HTML trajectory report
``dev``     :mod:`thyme.cli.dev`      tiny checkpoints, test servers
``serve``   :mod:`thyme.cli.serve`    the whole loop behind an OpenAI-compatible API
=========  ============================================================================

Shared helpers live in the leaf :mod:`thyme.cli.entry`; no command module imports another.
This package is the only one that builds argparse parsers. ``python -m thyme.cli ...`` is the
same as ``thyme ...`` (what ``accelerate launch -m thyme.cli train sft ...`` runs on every
process). Errors in the user's input (:class:`thyme.errors.ThymeError`) print one clear
message and exit with status 2; other failures exit with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from .entry import guarded, leave_now

#: ``thyme`` sub-commands, in ``--help`` order: each a module of this package.
COMMANDS = ("run", "serve", "replay", "sandbox", "eval", "data", "train", "report", "dev")


def _module(name: str) -> Any:
    return importlib.import_module(f"{__name__}.{name}")


def build_parser() -> argparse.ArgumentParser:
    """The ``thyme`` parser with every command group registered."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog="thyme", description="Thyme: think beyond images. A VLM that reasons with code run in a sandbox.")
    parser.add_argument("--version", action="version", version=f"thyme {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        _module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; returns the exit status."""
    args = build_parser().parse_args(argv)
    status = guarded(_module(args.command).run, args)
    if status == 130 and argv is None:  # Ctrl-C on the process's own command line: out within a second
        leave_now(status)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
