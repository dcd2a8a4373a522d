"""Backends and engines built by name: the one place that maps ``hf``, ``openai``, ``replay``,
``vllm_colocate``... to the code that builds them.

Two registries share one mechanism (:class:`Registry`: name -> factory, resolved lazily from a
``"package.module:attr"`` path the first time it is used, so naming a kind never imports
torch, vLLM or httpx):

- **backends** (message level, :class:`thyme.backends.base.Backend`): :func:`build_backend`
  ``("hf" | "openai" | "replay", config, **options)``. Each kind is a :class:`BackendKind`:
  its factory, the config dataclass its YAML ``model:`` section fills, and the command-line
  option that selects it, so the commands choose a backend from a table
  (:func:`select_backend`) instead of an ``if``/``elif`` on names.
- **engines** (token level, sampled ids kept: the RL / veRL rollout): :func:`build_engine`
  ``("hf" | "vllm_colocate" | "vllm_server", *args, **kwargs)``.

Plugins add kinds with :func:`register_backend` / :func:`register_engine`; an unknown name is
a :class:`thyme.errors.ThymeError` that lists the known ones.

Floor 4 (rollout): imports the backends (floor 2) and the engines lazily; the commands, eval,
train and veRL build through it.
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from ..errors import ThymeError

__all__ = [
    "BackendKind",
    "Registry",
    "backend_kind",
    "backend_kinds",
    "build_backend",
    "build_engine",
    "engine_kinds",
    "register_backend",
    "register_engine",
    "resolve",
    "select_backend",
]


def resolve(path: str) -> Any:
    """The object a ``"package.module:attr"`` path names (``attr`` may be dotted).

    Raises:
        ThymeError: a malformed path, a module that cannot be imported (e.g. an optional
            dependency is missing: the import error is quoted) or a missing attribute.
    """
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ThymeError(f"bad factory path {path!r}", "write it as 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise ThymeError(
            f"cannot import {module} for {path} ({e})", "install the extra that provides it (see the README's install section)"
        ) from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ThymeError(f"{module} has no attribute {attr!r} (factory path {path})") from None
    return obj


class Registry:
    """Names mapped to entries (factories, or descriptions holding one), resolved lazily.

    Args:
        what: what an entry builds, for messages (``"backend"``, ``"engine"``).

    An entry registered as a string ``"package.module:attr"`` is imported on the first
    :meth:`get` and cached; any other object is returned as registered.
    """

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, Any] = {}
        self._resolved: dict[str, Any] = {}
        self._lock = threading.Lock()

    def register(self, name: str, entry: Any, *, replace: bool = False) -> None:
        """Add ``name``.

        Raises:
            ValueError: ``name`` is empty or already registered (``replace=True`` overrides it).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} name must be a non-empty string, got {name!r}")
        with self._lock:
            if name in self._entries and not replace:
                raise ValueError(f"{self.what} {name!r} is already registered (pass replace=True to override it)")
            self._entries[name] = entry
            self._resolved.pop(name, None)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (no error when absent)."""
        with self._lock:
            self._entries.pop(name, None)
            self._resolved.pop(name, None)

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> Any:
        """The entry of ``name``, imported first when registered by path.

        Raises:
            ThymeError: an unknown name (the known ones are listed) or a path that does not
                import (:func:`resolve`).
        """
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ThymeError(
                f"unknown {self.what} {name!r}; known {self.what}s: {known}", f"register a new one with register_{self.what}(name, factory)"
            )
        if name in self._resolved:
            return self._resolved[name]
        entry = self._entries[name]
        obj = resolve(entry) if isinstance(entry, str) else entry
        with self._lock:
            if self._entries.get(name) is entry:
                self._resolved[name] = obj
        return obj


# --------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class BackendKind:
    """One kind of message-level backend.

    Attributes:
        name: the registry name (``"openai"``); also what provenance calls the backend.
        factory: ``factory(config, **options) -> Backend`` or its ``"module:attr"`` path.
        config: the settings dataclass the YAML ``model:`` section fills (or its path); ``None``
            when the kind takes no settings.
        option: the command-line option (its ``dest``) whose presence selects this kind:
            ``"model"``, ``"base_url"``, ``"replay"``.
        usage: how a user selects it, for messages (``"--base-url URL --model NAME"``).
        reads: further options the kind takes (``openai``: ``model``, the served name); an option
            read by a selected kind does not select another kind.
        needs: ``(option, how to give it)`` pairs the kind cannot do without.
        secret: ``(option, environment variable)``: a key taken from the option, else the model
            section, else the environment (never from provenance).
        labels: ``option -> name`` under which the commands record an option in provenance.
        local: loads the model in this process (its inputs are checked before loading, its
            prompts against the context after).
    """

    name: str
    factory: Callable[..., Any] | str
    config: type | str | None = None
    option: str | None = None
    usage: str = ""
    reads: tuple[str, ...] = ()
    needs: tuple[tuple[str, str], ...] = ()
    secret: tuple[str, str] | None = None
    labels: tuple[tuple[str, str], ...] = ()
    local: bool = False

    def config_class(self) -> type | None:
        """The settings dataclass (imported when given as a path).

        Raises:
            ThymeError: it cannot be imported (an optional dependency is missing).
        """
        return resolve(self.config) if isinstance(self.config, str) else self.config


BACKENDS = Registry("backend")
ENGINES = Registry("engine")


def register_backend(
    name: str,
    factory: Callable[..., Any] | str,
    *,
    config: type | str | None = None,
    option: str | None = None,
    usage: str = "",
    reads: Iterable[str] = (),
    needs: Iterable[tuple[str, str]] = (),
    secret: tuple[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    local: bool = False,
    replace: bool = False,
) -> BackendKind:
    """Register a backend kind (see :class:`BackendKind` for the arguments); returns it.

    Raises:
        ValueError: ``name`` is taken and ``replace`` is false.
    """
    kind = BackendKind(
        name, factory, config, option, usage, tuple(reads), tuple(tuple(n) for n in needs), secret, tuple((labels or {}).items()), local
    )
    BACKENDS.register(name, kind, replace=replace)
    return kind


def backend_kind(name: str) -> BackendKind:
    """The :class:`BackendKind` registered as ``name``.

    Raises:
        ThymeError: unknown name (the known ones are listed).
    """
    return BACKENDS.get(name)


def backend_kinds() -> list[str]:
    """Registered backend names, in registration order."""
    return BACKENDS.names()


def build_backend(kind: str, config: Any = None, **options: Any) -> Any:
    """Build a backend of ``kind``.

    Args:
        kind: ``"hf"``, ``"openai"``, ``"replay"`` or a registered plugin.
        config: the kind's settings: its config dataclass (``HFConfig``, ``OpenAIConfig``) or a
            mapping of the settings given (the rest keep their defaults); for ``replay`` the
            recorded responses ``{trajectory key: response text}``.
        options: what the command line says besides the settings: ``model=`` (hf: hub id or
            folder; openai: the served name), ``base_url=``, ``api_key=``, ``concurrency=``.

    Returns:
        The backend (a context manager; close it when done).

    Raises:
        ThymeError: unknown kind, a missing optional dependency, or bad settings (named).
        ModelLoadError: the hf model cannot be loaded.
    """
    spec = backend_kind(kind)
    factory = resolve(spec.factory) if isinstance(spec.factory, str) else spec.factory
    return factory(config, **options)


def select_backend(
    options: Mapping[str, Any], *, kinds: Iterable[str] | None = None, what: str = "say what answers the questions"
) -> BackendKind:
    """The one backend kind the given options select.

    Args:
        options: option dest -> value (``{"model": ..., "base_url": ..., "replay": ...}``);
            a falsy value counts as not given.
        kinds: the kinds this command offers (default: all registered), in the order its
            messages list them.
        what: the start of the message when none or several are selected.

    Raises:
        ThymeError: no kind or several kinds selected (each named), or a selected kind lacks an
            option it needs.
    """
    offered = [backend_kind(k) for k in (kinds if kinds is not None else backend_kinds())]
    given = {k for k, v in options.items() if v}
    read = {r for k in offered if k.option in given for r in k.reads}
    chosen = [k for k in offered if k.option in given and k.option not in read]
    if len(chosen) != 1:
        usages = [k.usage or f"--{k.option}" for k in offered]
        listed = usages[0] if len(usages) == 1 else ", ".join(usages[:-1]) + ", or " + usages[-1]
        got = [_flag(k.option) for k in reversed(chosen)]  # the most specific (last offered) first
        raise ThymeError(f"{what}: exactly one of {listed}" + (f" (got {', '.join(got)})" if got else ""))
    kind = chosen[0]
    for option, how in kind.needs:
        if not options.get(option):
            raise ThymeError(f"{_flag(kind.option)} needs {_flag(option)} {how}")
    return kind


def _flag(option: str | None) -> str:
    return "--" + (option or "?").replace("_", "-")


def _settings(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise ThymeError(f"backend settings must be a config dataclass or a mapping, got {type(config).__name__}")


def _build_hf(config: Any = None, *, model: str, **options: Any) -> Any:
    """:class:`thyme.backends.hf.HFBackend` loading ``model`` with ``config``'s settings."""
    from ..backends.hf import HFBackend

    return HFBackend(model, **{**_settings(config), **options})


def _build_openai(config: Any = None, **options: Any) -> Any:
    """:class:`thyme.backends.openai.OpenAIBackend`: ``base_url`` and ``model`` from the options
    (else the config); settings that are ``None`` keep the backend's defaults."""
    try:
        from ..backends.openai import OpenAIBackend
    except ImportError as e:
        raise ThymeError(
            f"the OpenAI-compatible backend is not available ({e})", "install thyme with the eval extra: pip install 'thyme[eval]'"
        ) from e
    values = {k: v for k, v in {**_settings(config), **options}.items() if v is not None}
    return OpenAIBackend(values.pop("base_url", None), values.pop("model", None), **values)


def _build_replay(config: Any = None, *, replay: str | None = None) -> Any:
    """:class:`thyme.backends.replay.ReplayBackend` over ``{trajectory key: recorded response}``
    (``config``). ``replay`` (the records file the command line names) is accepted for symmetry
    with the other kinds' options; the caller joins its records to its tasks and passes the
    responses.

    Raises:
        ThymeError: no responses given.
    """
    from ..backends.replay import ReplayBackend

    if not config:
        raise ThymeError(
            "the replay backend needs the recorded responses ({trajectory key: response})"
            + (f"; {replay} is read by the command that joins its records" if replay else ""),
            "thyme eval --replay RECORDS and thyme replay join the records to their questions",
        )
    return ReplayBackend(dict(config))


@dataclass(frozen=True)
class EngineContext:
    """What a rollout engine may be built from (one shape for every kind, so callers never branch
    on the engine's name).

    Attributes:
        model: the policy (HF ``PreTrainedModel``), for ``hf``.
        processor: the policy's processor (tokenizer, image processor with the run's pixel budget).
        suppress_ids: token ids the policy must never sample (image/video placeholders, vision
            start/end): the ids a rollout's pad counts would break.
        eos_ids: ids that end a turn (``<|im_end|>``, the tokenizer's EOS).
        pad_id: padding id for batched generation.
        llm: TRL's in-process ``vllm.LLM`` (``vllm_colocate``).
        client: TRL's vLLM server client (``vllm_server``).
        ats_engine: how the vLLM engines do ATS: ``auto`` / ``processor`` / ``resubmit``
            (:class:`~thyme.rollout.engines.vllm.VLLMColocateEngine`).
    """

    model: Any = None
    processor: Any = None
    suppress_ids: tuple[int, ...] = ()
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    llm: Any = None
    client: Any = None
    ats_engine: str = "auto"


def _hf_engine(ctx: EngineContext) -> Any:
    from .engines.hf import HFEngine

    return HFEngine(ctx.model, ctx.processor, list(ctx.suppress_ids), list(ctx.eos_ids), ctx.pad_id)


def _vllm_colocate_engine(ctx: EngineContext) -> Any:
    from .engines.vllm import VLLMColocateEngine, vllm_pixel_budget

    return VLLMColocateEngine(
        ctx.llm,
        ctx.processor.tokenizer,
        suppress_ids=list(ctx.suppress_ids),
        mm_processor_kwargs=vllm_pixel_budget(ctx.processor),
        ats=ctx.ats_engine,
    )


def _vllm_server_engine(ctx: EngineContext) -> Any:
    from .engines.vllm import VLLMServerEngine

    return VLLMServerEngine(
        ctx.client, ctx.processor.tokenizer, eos_ids=list(ctx.eos_ids), suppress_ids=list(ctx.suppress_ids), ats=ctx.ats_engine
    )


def build_engine(kind: str, *args: Any, **kwargs: Any) -> Any:
    """Build a token-level rollout engine of ``kind`` from an :class:`EngineContext` (the built-in
    kinds) or a plugin's own arguments.

    Args:
        kind: ``"hf"``, ``"vllm_colocate"``, ``"vllm_server"`` or a registered plugin.

    Raises:
        ThymeError: unknown kind (the known ones are listed) or an engine module that cannot be
            imported (e.g. vLLM is not installed).
    """
    return ENGINES.get(kind)(*args, **kwargs)


def register_engine(name: str, factory: Callable[..., Any] | str, *, replace: bool = False) -> None:
    """Register a rollout engine: its class or factory, or their ``"module:attr"`` path.

    Raises:
        ValueError: ``name`` is taken and ``replace`` is false.
    """
    ENGINES.register(name, factory, replace=replace)


def engine_kinds() -> list[str]:
    """Registered engine names, in registration order."""
    return ENGINES.names()


register_backend("hf", _build_hf, config="thyme.backends.hf:HFConfig", option="model", usage="--model ID", local=True)
register_backend(
    "openai",
    _build_openai,
    config="thyme.backends.openai:OpenAIConfig",
    option="base_url",
    usage="--base-url URL --model NAME",
    reads=("model",),
    needs=(("model", "NAME (the model name the server serves)"),),
    secret=("api_key", "OPENAI_API_KEY"),
    labels={"base_url": "base_url", "model": "served_model"},
)
register_backend("replay", _build_replay, option="replay", usage="--replay RECORDS")

register_engine("hf", _hf_engine)
register_engine("vllm_colocate", _vllm_colocate_engine)
register_engine("vllm_server", _vllm_server_engine)
