"""The leaf ``run`` and ``eval`` share to say which backend answers: its flags, and the choice.

The kind comes from :func:`thyme.rollout.registry.select_backend` (a table, not an
``if``/``elif`` on names): ``--model ID`` loads a checkpoint here (``hf``), ``--base-url URL
--model NAME`` talks to a vLLM / SGLang / OpenAI-compatible server (``openai``), ``--replay
RECORDS`` plays records back (``eval`` only). The settings of the chosen kind come from its
config dataclass: defaults <- YAML section ``model`` <- the flags given; a model flag the chosen
kind has no setting for is an error, never silently dropped.

Imports nothing of :mod:`thyme.cli` but :mod:`thyme.cli.entry` (no command module imports another).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import ThymeError
from .entry import HF_FLAGS, OPENAI_KEY_ENV, env_key, given_values

#: OpenAIConfig fields exposed as flags for ``--base-url`` (pixel budget: the model group's flags).
OPENAI_FLAGS = ("continuation", "send_stop", "image_format", "timeout_s", "max_retries", "extra_body", "tokenizer")
#: Every model flag a backend kind may read (``seed`` is the agent's flag, shared with ``hf``).
MODEL_FLAGS = (*HF_FLAGS, *OPENAI_FLAGS)


def add_server_flags(p: argparse.ArgumentParser, group: Any | None = None, *, where: bool = True, settings: bool = True) -> None:
    """The OpenAI-compatible server's flags (generated from :class:`thyme.backends.openai.OpenAIConfig`).

    Args:
        p: the command's parser.
        group: where ``--base-url`` and ``--api-key`` go (default: the server group).
        where: add ``--base-url`` and ``--api-key``.
        settings: add the server settings' flags (:data:`OPENAI_FLAGS`).
    """
    from ..backends.openai import OpenAIConfig
    from ..config import add_fields

    g = p.add_argument_group("OpenAI-compatible server (--base-url; YAML section model takes every field)") if settings or group is None else None
    if where:
        add_fields(group if group is not None else g, OpenAIConfig, ("base_url",), help_prefix="with --model NAME: ")
        add_fields(group if group is not None else g, OpenAIConfig, ("api_key",), help_prefix=f"for --base-url; else the model section's api_key, else ${OPENAI_KEY_ENV}: ")
    if settings:
        add_fields(g, OpenAIConfig, OPENAI_FLAGS, exclude=())


@dataclass
class BackendChoice:
    """The backend a command line asks for, not built yet.

    Attributes:
        kind: the registry name (``"hf"``, ``"openai"``, ``"replay"``).
        config: the kind's settings given in the model section or as flags (keys checked).
        options: the build options (``model``, ``base_url``, ``api_key``, ``concurrency``).
        settings: provenance for ``thyme eval``'s ``run.json`` (``backend``, ``model``,
            ``model_flags``, and the kind's labelled options; never the key).
        local: the kind loads the model in this process.
    """

    kind: str
    config: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    local: bool = False

    def factory(self) -> Callable[[], Any]:
        """A zero-argument function that builds the backend (what ``run_eval`` calls)."""
        from ..rollout.registry import build_backend

        return lambda: build_backend(self.kind, self.config, **self.options)


def choose_backend(
    args: argparse.Namespace,
    yaml_cfg: dict[str, Any],
    *,
    kinds: tuple[str, ...],
    replay: str | None = None,
    defaults: dict[str, Any] | None = None,
) -> BackendChoice:
    """The backend the flags select, with its settings.

    Args:
        args: the parsed command line (``model``, ``base_url``, ``api_key`` and the model flags).
        yaml_cfg: the ``--config`` sections (``model`` is the chosen kind's settings).
        kinds: the kinds this command offers, in the order its messages list them.
        replay: the records file when the command offers ``replay``.
        defaults: settings used when neither the section nor a flag gives them (``eval``:
            ``concurrency``).

    Raises:
        ThymeError: none or several sources given, a missing option (``--base-url`` without
            ``--model``), a model flag or section key the kind has no setting for.
    """
    from ..rollout.registry import select_backend

    given = {"replay": replay, "base_url": getattr(args, "base_url", None), "model": getattr(args, "model", None)}
    kind = select_backend(given, kinds=kinds)
    options = {o: given.get(o) for o in (kind.option, *kind.reads) if given.get(o) is not None}
    cls = None
    if kind.config is not None:
        try:
            cls = kind.config_class()
        except ThymeError:  # an optional dependency is missing: the factory says what to install
            cls = None
    section = dict(yaml_cfg.get("model") or {})
    if kind.config is None:
        config: dict[str, Any] = {}
    elif cls is None:
        config = {k: v for k, v in {**section, **{n: getattr(args, n, None) for n in MODEL_FLAGS}}.items() if v is not None}
    else:
        names = {f.name for f in dataclasses.fields(cls)}
        stray = [f"--{n.replace('_', '-')}" for n in MODEL_FLAGS if n not in names and getattr(args, n, None) is not None]
        if stray:
            raise ThymeError(f"{', '.join(stray)} do(es) not apply to the {kind.name} backend ({kind.usage})", "drop these flags")
        config = given_values(cls, section, args, tuple(n for n in (*MODEL_FLAGS, "seed") if n in names), section_name="model")
    for o in (kind.option, *kind.reads):
        config.pop(o, None)  # the command line says where and which
    if kind.secret is not None:
        name, env = kind.secret
        key = getattr(args, name, None) or config.get(name) or env_key(env)
        config.pop(name, None)
        if key is not None:
            options[name] = key
    for k, v in (defaults or {}).items():
        if cls is not None and k in {f.name for f in dataclasses.fields(cls)}:
            options[k] = config.pop(k, None) or v
    settings: dict[str, Any] = {}
    if kind.config is not None:  # what decides the predictions besides the agent settings
        settings = {**{label: given.get(o) for o, label in kind.labels}, "model_flags": dict(config), "backend": kind.name, "model": getattr(args, "model", None)}
    return BackendChoice(kind.name, config, options, settings, kind.local)
