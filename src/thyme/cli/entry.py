"""The leaf every command module shares: YAML sections, config building, and the error guard.

Imports nothing of :mod:`thyme.cli` (so no command module imports another) and only the
config helpers and errors of the ground floor at import time; the configs of the floors below
are imported lazily by the functions that build them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from ..errors import ThymeError

#: Sections of the one YAML file ``run``, ``replay`` and ``eval`` accept (``thyme CMD --config``).
RUNTIME_SECTIONS = ("agent", "sandbox", "model")


def add_config_flag(p: argparse.ArgumentParser) -> None:
    """``--config FILE.yaml``: sections agent / sandbox / model (flags override it)."""
    p.add_argument("--config", default=None, help="YAML file with sections agent/sandbox/model (flags override it)")


def load_sections(args: argparse.Namespace, used: set[str], *, known: set[str] | None = None) -> dict[str, Any]:
    """Read ``--config``'s sections for a command that uses ``used``.

    A known section the command does not use is ignored with a note on stderr (one YAML file
    serves ``run``, ``replay`` and ``eval`` alike); a section no command knows is an error.

    Raises:
        ThymeError: unreadable YAML, or an unknown section.
    """
    from ..config import check_sections, load_yaml

    path = getattr(args, "config", None)
    data = load_yaml(path)
    known = set(known or ()) | set(RUNTIME_SECTIONS) | set(used)
    check_sections(data, known, str(path))
    for name in sorted(set(data) - set(used)):
        print(f"note: {path}: section '{name}' is not used by this command; ignored", file=sys.stderr)
    return {k: v for k, v in data.items() if k in used}


def sandbox_config(args: argparse.Namespace, yaml_cfg: dict[str, Any]):
    from ..config import merge
    from ..sandbox import SandboxConfig

    cfg = merge(SandboxConfig(), yaml_cfg.get("sandbox"), source="config section 'sandbox'")
    return merge(cfg, {"timeout_s": args.timeout, "min_crop_side": args.min_crop_side}, source="flags")


def agent_config(args: argparse.Namespace, yaml_cfg: dict[str, Any]):
    from ..agent import AgentConfig
    from ..config import merge

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


def add_sandbox_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sandbox")
    g.add_argument("--timeout", type=float, default=None, help="wall-clock seconds per code execution (default 10)")
    g.add_argument("--min-crop-side", type=int, default=None, help="grow crops below this many pixels per side (reference: 64; 0 disables)")


def guarded(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command: bad input prints one clear message (status 2), Ctrl-C status 130."""
    try:
        return fn(args)
    except ThymeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
