"""Configuration files: YAML sections mapped onto the modules' config dataclasses.

A run's configuration is the dataclass defaults (the paper's / reference's values),
overridden by a YAML file, overridden by command-line flags. A YAML file has one section per
dataclass, e.g.::

    agent:   {max_rounds: 5, max_new_tokens: 2048, on_error: show}
    sandbox: {timeout_s: 10, min_crop_side: 64}
    model:   {max_pixels: 2408448, dtype: bfloat16}

Unknown sections or keys are errors (a typo must not silently fall back to a default).

The training stages (``thyme train sft|rl``) read their YAML with :func:`load_config`: the
trainer's fields at the top level or under ``sft:`` / ``rl:``, and beside them the same
sections as above where the stage has them (``sandbox:``, ``judge:``: fields of the stage config
whose default is a config dataclass); ``--set key=value`` overrides a field, ``--set
section.key=value`` a section's field. Their configs subclass the library's own
(``trl.GRPOConfig``, ``trl.SFTConfig``) through :func:`derive_config_class`, adding only
Thyme's fields. Secrets come from one environment variable each (:data:`JUDGE_API_KEY_ENV`,
:data:`MODEL_API_KEY_ENV`), the same in every command.

One source of truth: every field of a config dataclass is declared with :func:`setting`, which
puts its default, its help text and its source (paper / reference / ours) into the field's
metadata. :func:`add_fields` generates the command-line flags (and their ``--help`` texts) from
it, YAML keys are the field names, and :func:`build` applies defaults <- YAML section <- given
flags. No default is written twice.

This module must not import argparse: it receives the parser (or group) from :mod:`thyme.cli`,
the only package that builds parsers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import types
import typing
from typing import Any, Callable, Literal, TypeVar, Union

import yaml

from .errors import ThymeError

T = TypeVar("T")


def load_yaml(path: str | os.PathLike | None) -> dict[str, Any]:
    """Read a YAML mapping; ``None`` gives ``{}``.

    Raises:
        ThymeError: the file is missing, not YAML, or not a mapping.
    """
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ThymeError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ThymeError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ThymeError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def check_sections(data: dict[str, Any], allowed: set[str], source: str) -> None:
    """Raise a clear error for sections this command does not know."""
    unknown = set(data) - allowed
    if unknown:
        raise ThymeError(f"{source}: unknown section(s) {sorted(unknown)}", f"known sections: {sorted(allowed)}")


def merge(instance: T, values: dict[str, Any] | None, *, source: str) -> T:
    """Return a copy of dataclass ``instance`` with ``values`` applied (``None`` values skipped).

    Raises:
        ThymeError: a key is not a field of the dataclass.
    """
    if not values:
        return instance
    fields = {f.name for f in dataclasses.fields(instance)}  # type: ignore[arg-type]
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise ThymeError(
            f"{source}: unknown setting(s) {unknown} for {type(instance).__name__}",
            f"known settings: {sorted(fields)}",
        )
    return dataclasses.replace(instance, **{k: v for k, v in values.items() if v is not None})  # type: ignore[type-var]


# --------------------------------------------------------------------------- fields with metadata

_MISSING: Any = dataclasses.MISSING


def setting(
    default: Any = _MISSING,
    *,
    help: str,
    source: str | None = None,
    flag: str | None = None,
    default_factory: Any = _MISSING,
    metavar: str | None = None,
    show_default: str | None = None,
    const: Any = None,
    valid: dict[str, float] | None = None,
) -> Any:
    """A dataclass field carrying its default, its help text and its source.

    Args:
        default: the default value (or ``default_factory`` for mutable ones).
        help: what the setting does, one sentence or two (the ``--help`` text, no default in it).
        source: where the default comes from: ``"paper"``, ``"reference"``, ``"ours"``, or a
            short citation (``"reference eval: 2048"``).
        flag: the command-line flag when it is not ``--`` + the field name with dashes
            (e.g. ``"--timeout"`` for ``timeout_s``): flag names users type never change.
        metavar: the placeholder shown in ``--help``.
        show_default: how the default reads in ``--help`` when its value says little
            (``"os.cpu_count()"``, ``"the processor's"``).
        const: the flag's value when it is given without one (``--ray`` alone); the flag then
            takes an optional value.
        valid: the range of values that make sense, as bounds ``{"ge": 1}``, ``{"gt": 0, "le": 1}``
            (keys ``ge``, ``gt``, ``le``, ``lt``); checked by :func:`check_ranges`, which the
            dataclass's ``__post_init__`` calls (``None`` values pass).
    """
    metadata = {"help": help, "source": source, "flag": flag, "metavar": metavar, "show_default": show_default, "const": const}
    if valid:
        metadata["valid"] = dict(valid)
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_BOUNDS = {
    "ge": (">=", lambda v, b: v >= b),
    "gt": (">", lambda v, b: v > b),
    "le": ("<=", lambda v, b: v <= b),
    "lt": ("<", lambda v, b: v < b),
}


def valid_range(f: dataclasses.Field) -> str | None:
    """The range of a field's ``valid`` bounds as text (``">= 1"``, ``"> 0 and <= 1"``); None without."""
    valid = f.metadata.get("valid")
    if not valid:
        return None
    return " and ".join(f"{_BOUNDS[k][0]} {b:g}" for k, b in valid.items())


def check_ranges(obj: Any) -> None:
    """Check every field of the dataclass instance ``obj`` against its ``valid`` bounds (see
    :func:`setting`): the one place a value that makes no sense (``max_rounds 0``,
    ``temperature -1``) is refused, whichever of flag, YAML or code set it.

    Raises:
        ValueError: naming the field, its flag, the valid range and the value given
            (:func:`build` turns it into a ThymeError; the cli exits 2).
    """
    for f in dataclasses.fields(obj):
        valid = f.metadata.get("valid")
        v = getattr(obj, f.name)
        if not valid or v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{flag_name(f)} ({f.name}) must be a number {valid_range(f)}, got {v!r}")
        if not all(_BOUNDS[k][1](v, b) for k, b in valid.items()):
            raise ValueError(f"{flag_name(f)} ({f.name}) must be {valid_range(f)}, got {v!r}")


def field_default(f: dataclasses.Field) -> Any:
    """The default of a dataclass field (``default_factory`` called); MISSING when it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # the defining module is not importable as such: builtins and typing names
        import builtins

        names = {**vars(typing), **vars(builtins)}
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            try:
                out[f.name] = eval(f.type, names) if isinstance(f.type, str) else f.type  # noqa: S307 - our own annotations
            except Exception:
                out[f.name] = Any
        return out


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def flag_name(f: dataclasses.Field, prefix: str = "") -> str:
    """The command-line flag of field ``f`` (``--`` + prefix + name with dashes, or its ``flag``)."""
    own = f.metadata.get("flag")
    if own:
        return own if not prefix else "--" + prefix + own.lstrip("-")
    return "--" + prefix + f.name.replace("_", "-")


def _dest(f: dataclasses.Field, prefix: str = "") -> str:
    return flag_name(f, prefix).lstrip("-").replace("-", "_")


def help_text(f: dataclasses.Field) -> str:
    """``help (default X; source)`` for field ``f``, from its metadata."""
    md = f.metadata
    text = md.get("help") or ""
    shown = md.get("show_default")
    if shown is None:
        d = field_default(f)
        if d is dataclasses.MISSING:
            shown = "required"
        elif d is None:
            shown = "none"
        elif isinstance(d, bool):
            shown = "on" if d else "off"
        elif isinstance(d, str):
            shown = repr(d)
        elif isinstance(d, (dict, list, tuple)) and not d:
            shown = "none"
        else:
            shown = str(d)
    extra = f"default {shown}"
    if md.get("source"):
        extra += f"; {md['source']}"
    return f"{text} ({extra})" if text else f"({extra})"


def describe(cls: type, names: typing.Iterable[str] | None = None) -> str:
    """One line per field: ``name: help (default X; source)`` (for an ``--help`` epilog)."""
    fields = _fields(cls)
    return "\n".join(f"  {n}: {help_text(fields[n])}" for n in (names if names is not None else fields))


def add_fields(
    parser: Any,
    cls: type,
    names: typing.Iterable[str] | None = None,
    *,
    prefix: str = "",
    exclude: typing.Iterable[str] = (),
    help_prefix: str = "",
) -> list[str]:
    """Add flags for fields of dataclass ``cls`` to an argparse parser or argument group.

    Each flag gets its type from the annotation (``Literal`` gives the choices, ``bool`` gives
    ``--x/--no-x``, a dict is read as JSON, a tuple/list takes several values), ``default=None``
    (so only flags given on the command line override the YAML file and the defaults) and the
    help text ``help (default X; source)``.

    Args:
        parser: an ``argparse.ArgumentParser`` or argument group (built by :mod:`thyme.cli`).
        cls: the config dataclass.
        names: fields to add, in this order (default: every field that has help metadata).
        prefix: put before every flag name (``"judge-"``: ``--judge-base-url``).
        exclude: fields not to add.
        help_prefix: put before every help text.

    Returns:
        The names of the fields added.
    """
    # The parser is the cli's (this module never imports argparse): its own module has the actions.
    boolean_action = sys.modules[type(parser).__module__].BooleanOptionalAction
    fields = _fields(cls)
    hints = _hints(cls)
    skip = set(exclude)
    chosen = list(names) if names is not None else [n for n, f in fields.items() if f.metadata.get("help")]
    added = []
    for name in chosen:
        if name in skip:
            continue
        if name not in fields:
            raise KeyError(f"{cls.__name__} has no field {name!r}")
        f = fields[name]
        tp = _unwrap_optional(hints.get(name, f.type))
        kw: dict[str, Any] = {"default": None, "dest": _dest(f, prefix), "help": (help_prefix + help_text(f)).replace("%", "%%")}
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = boolean_action
            kw.pop("metavar", None)
        elif origin is Literal:
            choices = list(typing.get_args(tp))
            kw["choices"] = choices
            kw["type"] = type(choices[0])
        elif origin in (tuple, list) or tp in (tuple, list):
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            kw["nargs"] = "+"
            if args and args[0] in (int, float, str):
                kw["type"] = args[0]
        elif origin is dict or tp is dict:
            kw["type"] = json.loads
            kw.setdefault("metavar", "JSON")
        elif tp in (int, float, str):
            kw["type"] = tp
        if f.metadata.get("const") is not None and tp is not bool:
            kw["nargs"] = "?"
            kw["const"] = f.metadata["const"]
        # anything else (Any, unions): taken as text
        parser.add_argument(flag_name(f, prefix), **kw)
        added.append(name)
    return added


def flag_values(cls: type, args: Any, names: typing.Iterable[str] | None = None, *, prefix: str = "") -> dict[str, Any]:
    """The fields of ``cls`` given as flags in the argparse namespace ``args`` (``None``: not given)."""
    fields = _fields(cls)
    out: dict[str, Any] = {}
    for name in names if names is not None else fields:
        f = fields[name]
        v = getattr(args, _dest(f, prefix), None)
        if v is not None:
            if isinstance(v, list) and typing.get_origin(_unwrap_optional(_hints(cls).get(name, f.type))) is tuple:
                v = tuple(v)
            out[name] = v
    return out


def check_keys(cls: type, values: dict[str, Any] | None, *, source: str) -> None:
    """Raise :class:`ThymeError` naming every key of ``values`` that is not a field of ``cls``
    and listing the known ones."""
    if not values:
        return
    if not isinstance(values, dict):
        raise ThymeError(f"{source}: must be a mapping of settings, got {type(values).__name__}", f"known settings: {sorted(_fields(cls))}")
    known = set(_fields(cls))
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ThymeError(f"{source}: unknown setting(s) {unknown} for {cls.__name__}", f"known settings: {sorted(known)}")


def build(
    cls: type[T],
    section: dict[str, Any] | None = None,
    args: Any = None,
    *,
    names: typing.Iterable[str] | None = None,
    prefix: str = "",
    section_name: str | None = None,
    extra: dict[str, Any] | None = None,
) -> T:
    """Build ``cls`` from its defaults <- a YAML ``section`` <- the flags given in ``args``.

    Args:
        section: the YAML section (field names as keys).
        args: an argparse namespace from a parser :func:`add_fields` filled (or ``None``).
        names: the fields to read from ``args`` (default: all of them that are there).
        prefix: the flag prefix :func:`add_fields` used.
        section_name: the section's name, for error messages.
        extra: values applied last (e.g. from the environment), ``None`` values skipped.

    Raises:
        ThymeError: a key of the section is not a field (named, with the known ones), or the
            dataclass refuses a value.
    """
    where = f"config section '{section_name}'" if section_name else f"{cls.__name__} settings"
    check_keys(cls, section, source=where)
    values = {k: v for k, v in (section or {}).items() if v is not None}
    if args is not None:
        values.update(flag_values(cls, args, names, prefix=prefix))
    values.update({k: v for k, v in (extra or {}).items() if v is not None})
    check_keys(cls, values, source=where)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ThymeError(f"{where}: {e}") from None


# --------------------------------------------------------------------------- stage configs (train sft / train rl)


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` (``--set`` flags) -> ``{key: YAML-parsed value}``.

    Raises:
        ThymeError: an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ThymeError(f"--set expects key=value, got {item!r}", "e.g. --set learning_rate=2e-5")
        try:
            out[key.strip()] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


#: Environment variables that hold secrets: one per secret, read the same way by every command
#: that needs it (``thyme eval``, ``thyme train rl``, the veRL reward). A key given in a config
#: file or as a flag wins over the variable; an empty variable counts as unset.
MODEL_API_KEY_ENV = "OPENAI_API_KEY"  # the model server of ``--base-url`` (OpenAI's own name)
JUDGE_API_KEY_ENV = "THYME_JUDGE_API_KEY"  # the judge server (never the model server's key)
TEACHER_API_KEY_ENV = "THYME_TEACHER_API_KEY"  # the data-construction teacher(s) and verifier of ``thyme data synthesize``


def env_secret(name: str) -> str | None:
    """The secret held by environment variable ``name`` (empty or unset: ``None``)."""
    return os.environ.get(name) or None


def section_fields(cls: type) -> dict[str, type]:
    """The fields of dataclass ``cls`` that are sections of their own (their default is a
    dataclass instance, e.g. ``sandbox: SandboxConfig``): ``{field name: section class}``."""
    out: dict[str, type] = {}
    for name, f in _fields(cls).items():
        d = field_default(f)
        if dataclasses.is_dataclass(d) and not isinstance(d, type):
            out[name] = type(d)
    return out


def load_config(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    section: str,
    aliases: dict[str, str | None] | None = None,
    defaults: dict[str, Any] | None = None,
    overrides_source: str = "--set",
) -> T:
    """A stage config dataclass from its defaults <- a YAML file <- ``overrides`` (``--set``).

    The file holds the stage's fields at its top level or under one ``section:`` key (``sft``,
    ``rl``). Fields whose default is itself a config dataclass (:func:`section_fields`, e.g.
    ``sandbox`` or ``judge``) are sections: in the file they are mappings, at the top level
    beside the ``section:`` key or inside it (``sandbox: {allow_weaker: true}``), and a
    ``--set`` key reaches one of their fields with a dot (``sandbox.allow_weaker=true``). A
    section's values apply over the field's default instance, so a section that sets one key
    keeps the stage's defaults for the others (the RL stage's required sandbox layers).

    Numbers written the YAML 1.1 way (``1e-5`` reads as a string) become numbers; an int where
    a float is expected becomes a float; an explicit ``null`` is kept (it can switch a setting off).

    Args:
        aliases: old or short key -> its field (``"judge_model": "judge.model"``); ``None``:
            the key was removed, the error says so (the value of ``aliases`` is then ignored).
        defaults: values applied before the file (a caller's own defaults).
        overrides_source: how errors name where ``overrides`` came from.

    Raises:
        ThymeError: an unreadable file, other top-level keys beside ``section`` that are not
            sections, unknown keys (named, with the known ones), a section that is not a
            mapping, a value that is not the number it must be, or a value the class's own
            checks (``__post_init__``) refuse.
    """
    data = load_yaml(path)
    sections = section_fields(cls)
    if section in data and isinstance(data[section], dict):
        extra = set(data) - {section}
        alias_sections = {a.split(".", 1)[0] for a in (aliases or {}) if "." in a}
        stray = sorted(extra - set(sections) - alias_sections)
        if stray:
            raise ThymeError(
                f"{path}: unknown section(s) {stray} beside '{section}'", f"sections this file may hold: {sorted({section, *sections})}"
            )
        inner = dict(data[section])
        for name in sorted(extra):
            if name in inner:
                raise ThymeError(f"{path}: '{name}' is given both inside '{section}' and beside it; keep one")
            inner[name] = data[name]
        data = inner
    fields = _fields(cls)
    hints = _hints(cls)
    values: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for source, new in (("defaults", defaults or {}), (f"config file {path}", data), (overrides_source, overrides or {})):
        for key, v in _expand_aliased_sections(new, aliases or {}, set(fields)):
            key = _resolve_alias(str(key), aliases or {}, source)
            head, dot, rest = key.partition(".")
            if head not in fields or (dot and head not in sections):
                raise ThymeError(f"{source}: unknown setting(s) {[key]} for {cls.__name__}", f"known settings: {sorted(fields)}")
            if head in sections:
                if dot:
                    nested.setdefault(head, {})[rest] = v
                elif v is None:
                    continue  # an empty section (``sandbox:`` with nothing under it)
                elif isinstance(v, dict):
                    nested.setdefault(head, {}).update({str(k): x for k, x in v.items()})
                else:
                    raise ThymeError(
                        f"{source}: '{head}' is a section: give a mapping of its settings, got {type(v).__name__}",
                        f"e.g. {head}: {{...}} in the file, or --set {head}.KEY=VALUE",
                    )
                continue
            values[key] = _coerce(key, v, hints.get(key, fields[key].type), source)
    for head, given in nested.items():
        values[head] = _apply_section(field_default(fields[head]), given, head)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ThymeError(f"{cls.__name__}: {e}") from None


def _expand_aliased_sections(given: dict[str, Any], aliases: dict[str, str | None], fields: set[str]) -> list[tuple[str, Any]]:
    """``given``'s items, with each mapping under a name that is no field but that ``aliases``
    knows as a section (an ``"agent.max_rounds"`` entry makes ``agent`` one) spelled out as dotted
    keys, so a run/eval section (``agent: {max_rounds: 4}``) reaches the fields it maps to."""
    out: list[tuple[str, Any]] = []
    for key, v in given.items():
        key = str(key)
        if key not in fields and isinstance(v, dict) and any(a.startswith(key + ".") for a in aliases):
            out.extend((f"{key}.{k}", x) for k, x in v.items())
        else:
            out.append((key, v))
    return out


def _resolve_alias(key: str, aliases: dict[str, str | None], source: str) -> str:
    if key not in aliases:
        return key
    target = aliases[key]
    if target is None:
        raise ThymeError(f"{source}: setting '{key}' was removed", _REMOVED_HINTS.get(key, "see the README"))
    return target


#: Why a removed key is gone, keyed by its name (the error's hint).
_REMOVED_HINTS: dict[str, str] = {
    "judge_api_key_env": f"the judge's key is read from the environment variable {JUDGE_API_KEY_ENV} (or the judge section's api_key)",
}


def _apply_section(base: Any, given: dict[str, Any], name: str) -> Any:
    """``base`` (a config dataclass instance) with the section's values applied (keys checked,
    numbers coerced, the class's own checks run again)."""
    cls = type(base)
    where = f"config section '{name}'"
    check_keys(cls, given, source=where)
    fields = _fields(cls)
    hints = _hints(cls)
    values = {k: _coerce(k, v, hints.get(k, fields[k].type), where) for k, v in given.items()}
    try:
        return dataclasses.replace(base, **values)
    except (TypeError, ValueError) as e:
        raise ThymeError(f"{where}: {e}") from None


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    args = set(typing.get_args(hint)) or {hint}
    if not isinstance(value, str):
        if isinstance(value, int) and not isinstance(value, bool) and float in args and int not in args:
            return float(value)
        return value
    for typ in (int, float):
        if typ in args:
            try:
                return typ(value)
            except ValueError:
                if typ is float or float not in args:
                    raise ThymeError(f"{source}: {name} must be a number, got {value!r}") from None
    return value


def built_once(build: Callable[[], type]) -> Callable[[], type]:
    """``build`` wrapped so that it runs once per process, under a lock, and its class is returned
    to every later caller: the config classes derived from a library's config
    (:func:`derive_config_class`) import that library, so they are built on first use, and two
    threads must never build two distinct classes (``isinstance`` would then fail across them)."""
    lock = threading.Lock()
    box: list[type] = []

    def get() -> type:
        with lock:
            if not box:
                box.append(build())
        return box[0]

    get.__doc__ = build.__doc__
    return get


def derive_config_class(
    name: str,
    own: type,
    base: type,
    defaults: dict[str, tuple[Any, str, str | None]],
    *,
    post_init: Any,
    module: str,
    doc: str,
) -> type:
    """A dataclass subclass of a library's config ``base`` (``trl.GRPOConfig``, ``trl.SFTConfig``)
    and Thyme's own fields ``own``, with Thyme's defaults for some of the library's fields.

    Every field of ``base`` keeps its name, type and the library's help text; ``defaults`` maps a
    field of ``base`` to ``(default, source, help)``: ``help`` ``None`` keeps the library's text,
    a text replaces it where Thyme gives the field another meaning. A name ``base`` does not have
    (another version of the library) is skipped. ``post_init`` becomes ``__post_init__``.
    """
    fields = getattr(base, "__dataclass_fields__", {})
    specs = []
    for field_name, (default, source, own_help) in defaults.items():
        f = fields.get(field_name)
        if f is None:
            continue
        help_ = own_help or f.metadata.get("help", "")
        if isinstance(default, (list, dict)):
            spec = setting(default_factory=lambda d=default: type(d)(d), help=help_, source=source)
        else:
            spec = setting(default, help=help_, source=source)
        specs.append((field_name, f.type, spec))
    cls = dataclasses.make_dataclass(
        name, specs, bases=(own, base), namespace={"__post_init__": post_init, "__doc__": doc, "__module__": module}
    )
    cls.__qualname__ = name
    return cls


def _yaml_value(v: Any) -> Any:
    import enum

    if isinstance(v, enum.Enum):
        return v.value
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {k: _yaml_value(x) for k, x in dataclasses.asdict(v).items()}
    if isinstance(v, dict):
        return {str(k): _yaml_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_yaml_value(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def record_of(cfg: Any, own: type, base: type, defaults: dict[str, Any], *, redact: typing.Iterable[str] = ()) -> dict[str, Any]:
    """A YAML-safe record of a :func:`derive_config_class` config: every field of ``own``
    (sections as mappings), and each field of ``base`` that is in ``defaults`` or differs from
    ``base``'s default. ``redact`` names ``section.field`` values written as ``<redacted>``."""
    out: dict[str, Any] = {}
    own_names = {f.name for f in dataclasses.fields(own)}
    base_fields = {f.name: f for f in dataclasses.fields(base)}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in own_names:
            out[f.name] = _yaml_value(v)
        elif f.name in base_fields and f.init:
            d = field_default(base_fields[f.name])
            if f.name in defaults or _yaml_value(v) != _yaml_value(None if d is dataclasses.MISSING else d):
                out[f.name] = _yaml_value(v)
    for path in redact:
        head, _, key = path.partition(".")
        if isinstance(out.get(head), dict) and out[head].get(key):
            out[head][key] = "<redacted>"
    return out
