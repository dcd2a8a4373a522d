"""The leaf every command module shares: YAML sections, flags generated from the configs, the error guard.

Flags, their ``--help`` texts and YAML keys all come from the config dataclasses' field
metadata (:func:`thyme.config.setting`, :func:`thyme.config.add_fields`); this module only
chooses which fields each command exposes. Configuration is defaults <- ``--config`` YAML
section <- given flags (:func:`thyme.config.build`).

Imports nothing of :mod:`thyme.cli` (so no command module imports another); the configs of
the floors below are imported by the functions that need them.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from ..errors import ThymeError

#: Sections of the one YAML file ``run``, ``replay`` and ``eval`` accept (``thyme CMD --config``).
RUNTIME_SECTIONS = ("agent", "sandbox", "model")
#: Every section any command knows: a command ignores (with a note) the ones it does not use.
ALL_SECTIONS = (*RUNTIME_SECTIONS, "eval", "judge", "serve")

#: Environment variables of the model server's and the judge's keys (``--api-key`` /
#: ``--judge-api-key`` / YAML win), named once in :mod:`thyme.config` for every command.
from ..config import JUDGE_API_KEY_ENV as JUDGE_KEY_ENV  # noqa: E402, F401 (re-exported)
from ..config import MODEL_API_KEY_ENV as OPENAI_KEY_ENV  # noqa: E402, F401 (re-exported)

#: Agent fields exposed as flags (``--max-new-tokens``...); the rest are YAML-only.
AGENT_FLAGS = ("max_new_tokens", "max_rounds", "temperature", "seed", "on_error", "shown_path", "prefill", "ats")
#: Sandbox fields exposed as flags (``--timeout``, ``--min-crop-side``).
SANDBOX_FLAGS = ("timeout_s", "min_crop_side")
#: Loading settings of the hf backend exposed as flags (``seed`` is the agent's flag, shared).
HF_FLAGS = ("revision", "dtype", "device_map", "attn_implementation", "min_pixels", "max_pixels", "kv_cache")


def add_config_flag(p: argparse.ArgumentParser, sections: str = "agent/sandbox/model") -> None:
    """``--config FILE.yaml``: the YAML sections (flags override it)."""
    p.add_argument(
        "--config", default=None, help=f"YAML file with sections {sections} (keys: the long flag names with underscores; flags override it)"
    )


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
    known = set(known or ()) | set(ALL_SECTIONS) | set(used) | {"images"}
    check_sections(data, known, str(path))
    if data.get("images") is not None:  # every command: the caller's image budgets (thyme.imageio.ImageLimits)
        from ..imageio import configure_images

        configure_images(data["images"])
    for name in sorted(set(data) - set(used) - {"images"}):
        print(f"note: {path}: section '{name}' is not used by this command; ignored", file=sys.stderr)
    for name, section in data.items():
        if section is not None and not isinstance(section, dict):
            raise ThymeError(f"{path}: section '{name}' must be a mapping of settings, got {type(section).__name__}")
    return {k: v for k, v in data.items() if k in used}


# --------------------------------------------------------------------------- flags


def add_agent_flags(p: Any, names: tuple[str, ...] = AGENT_FLAGS, *, title: str | None = "agent") -> None:
    """The agent's flags (generated from :class:`thyme.agent.AgentConfig`)."""
    from ..agent import AgentConfig
    from ..config import add_fields

    add_fields(p.add_argument_group(title) if title else p, AgentConfig, names)


def add_sandbox_flags(p: Any) -> None:
    """``--timeout``, ``--min-crop-side`` (generated from :class:`thyme.sandbox.SandboxConfig`)."""
    from ..config import add_fields
    from ..sandbox.config import SandboxConfig

    add_fields(p.add_argument_group("sandbox"), SandboxConfig, SANDBOX_FLAGS)


def add_hf_flags(p: Any, names: tuple[str, ...] = HF_FLAGS, *, title: str = "model (transformers backend)") -> None:
    """The hf backend's loading flags (generated from :class:`thyme.backends.hf.HFConfig`)."""
    from ..backends.hf import HFConfig
    from ..config import add_fields

    add_fields(p.add_argument_group(title), HFConfig, names)


# --------------------------------------------------------------------------- configs


def sandbox_config(args: argparse.Namespace, yaml_cfg: dict[str, Any]):
    """:class:`SandboxConfig` from defaults <- section ``sandbox`` <- flags."""
    from ..config import build
    from ..sandbox.config import SandboxConfig

    return build(SandboxConfig, yaml_cfg.get("sandbox"), args, names=SANDBOX_FLAGS, section_name="sandbox")


def agent_config(args: argparse.Namespace, yaml_cfg: dict[str, Any]):
    """:class:`AgentConfig` from defaults <- section ``agent`` <- flags."""
    from ..agent import AgentConfig
    from ..config import build

    return build(AgentConfig, yaml_cfg.get("agent"), args, names=AGENT_FLAGS, section_name="agent")


def hf_config(args: argparse.Namespace, yaml_cfg: dict[str, Any]):
    """:class:`HFConfig` from defaults <- section ``model`` <- flags (``--seed`` included)."""
    from ..backends.hf import HFConfig
    from ..config import build

    return build(HFConfig, yaml_cfg.get("model"), args, names=(*HF_FLAGS, "seed"), section_name="model")


def given_values(
    cls: type, section: dict[str, Any] | None, args: argparse.Namespace, names: tuple[str, ...], *, section_name: str
) -> dict[str, Any]:
    """The settings of ``cls`` given in a YAML section or as flags (flags win), keys checked.

    Raises:
        ThymeError: a key of the section is not a field of ``cls`` (named, with the known ones).
    """
    from ..config import check_keys, flag_values

    check_keys(cls, section, source=f"config section '{section_name}'")
    values = {k: v for k, v in (section or {}).items() if v is not None}
    values.update(flag_values(cls, args, names))
    return values


def env_key(name: str) -> str | None:
    """An API key from the environment variable ``name`` (empty counts as unset)."""
    return os.environ.get(name) or None


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


def missing_folders(path: str | os.PathLike, *, folder: bool = False) -> list[str]:
    """The folders a command would create to write ``path`` (``folder``: ``path`` is itself a
    folder), outermost first: what :func:`remove_empty_folders` may take away again."""
    from pathlib import Path

    p = Path(path).absolute()
    p = p if folder else p.parent
    out = []
    while not p.exists() and p != p.parent:
        out.append(str(p))
        p = p.parent
    return out[::-1]


def remove_empty_folders(folders: list[str], *, disposable: tuple[str, ...] = ()) -> None:
    """Remove the folders of :func:`missing_folders` that a failed command created and left
    without results (innermost first). A folder is removed when it is empty but for the
    ``disposable`` sub-folders (derived files the command can make again, e.g. ``eval``'s
    ``images`` extracted from the data, removed with it); a folder with anything else is kept."""
    import shutil

    for d in reversed(folders):
        try:
            names = os.listdir(d)
            if any(n not in disposable or not os.path.isdir(os.path.join(d, n)) or os.path.islink(os.path.join(d, n)) for n in names):
                return
            for n in names:
                shutil.rmtree(os.path.join(d, n))
            os.rmdir(d)
        except OSError:
            return


def leave_now(status: int) -> None:
    """End the process at once with ``status`` after a Ctrl-C (the ``thyme`` command line only).

    The command has already stopped and written what it had; the atexit handlers still run
    (logging, temporary folders), but not the interpreter's teardown of its modules, which
    takes seconds with torch loaded, nor its wait for worker threads still in flight. A further
    Ctrl-C meanwhile ends it at once with the same status, without a traceback.
    """
    import atexit
    import signal

    try:
        signal.signal(signal.SIGINT, lambda signum, frame: os._exit(status))
    except ValueError:  # not the main thread
        pass
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream must not keep the process alive
                pass
        os._exit(status)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for an integer flag with a lower bound (``--num-samples``): a value
    below it is a usage error naming the flag and the range (exit 2)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v

    return parse
