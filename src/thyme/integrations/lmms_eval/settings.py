"""What ``--model thyme_agent --model_args ...`` means: the plugin's settings, the thyme config
it reads, the backend it builds, and the prompt suffix of each lmms-eval task (no lmms-eval import).

model_args (``key=value`` pairs, comma separated, as lmms-eval passes them):

- ``model=CKPT`` (a checkpoint folder or hub id: the ``hf`` backend, loaded in the lmms-eval
  process) or ``base_url=URL,model=NAME`` (an OpenAI-compatible server: the ``openai`` backend);
  ``backend=KIND`` picks another kind registered in :mod:`thyme.rollout.registry`.
- ``config=FILE.yaml``: a thyme config with the sections of ``thyme eval --config``: ``agent``,
  ``sandbox``, ``model`` (the backend's settings, the pixel budget among them), ``images``, and
  ``eval`` (only ``concurrency`` and ``schedule`` apply here); ``judge`` is ignored (lmms-eval
  scores).
- ``suffix=``: the reference's per-task prompt suffix (:class:`SuffixRule`); ``content=answer|full``;
  ``concurrency=N``; ``min_pixels=``, ``max_pixels=`` (over the config's ``model`` section);
  ``output_dir=DIR`` (``trajectories.jsonl`` and the sandbox's images are kept there).

Pixel budget: the reference's (its VLMEvalKit model kept the processor's defaults: Qwen2.5-VL's
``min_pixels=3136``, ``max_pixels=12845056``), which is what the ``hf`` backend uses when the
config sets none (the checkpoint's own processor) and the ``openai`` backend's default
(:data:`thyme.backends.openai.QWEN_MAX_PIXELS`). lmms-eval's own Qwen2.5-VL models (and its
built-in ``thyme``) default to ``min_pixels=256*28*28``, ``max_pixels=1605632`` instead: a
budget 8x smaller at the top, which changes what the model sees on high-resolution benchmarks.
The plugin logs the budget it runs with.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal

from ...config import MODEL_API_KEY_ENV, build, check_keys, check_sections, load_yaml, setting
from ...errors import ThymeError
from ...evaluate.prompts import PROMPT_STYLES

#: The name lmms-eval knows the plugin by (``--model thyme_agent``); lmms-eval's built-in
#: ``thyme`` is another model (the reference's in-process sandbox on Qwen2.5-VL).
MODEL_NAME = "thyme_agent"

#: The sections of a thyme config the plugin reads (``thyme eval --config``'s).
SECTIONS = ("eval", "agent", "sandbox", "model", "images")
#: Sections a thyme config may have that the plugin ignores (with a note).
IGNORED_SECTIONS = ("judge", "serve")
#: The ``eval`` section's settings the plugin uses (the others name thyme eval's data and output).
EVAL_KEYS = ("concurrency", "schedule")
#: model_args lmms-eval itself adds (``--batch_size``, ``--device``): accepted, not used.
LMMS_EVAL_ARGS = ("batch_size", "max_batch_size", "device")

#: lmms-eval lower bound and upper bound of its Qwen2.5-VL models' pixel budget (for the log line).
LMMS_EVAL_QWEN_PIXELS = (256 * 28 * 28, 1605632)

#: lmms-eval tasks (fnmatch patterns over the task name) whose VLMEvalKit dataset type the
#: reference's suffix rule needs and the doc's form does not show (ThymePromptMixin: Y/N gets
#: " Please answer yes or no." except MME; VQA gets the short-answer line except MMVet).
TASK_STYLES: dict[str, str] = {
    "mme": "none",  # Y/N, but the reference adds nothing for MME
    "mme_*": "none",
    "mmvet*": "none",  # VQA, but the reference adds nothing for MMVet
    "hallusion_bench*": "yorn",
    "pope*": "yorn",
}

_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.):]\s*\S", re.M)
_OPTIONS_HEAD = re.compile(r"^\s*(Options|Choices)\s*:", re.M | re.I)


@dataclass
class LmmsEvalSettings:
    """The model_args of ``--model thyme_agent`` (module docstring)."""

    model: str = setting("", help="checkpoint folder or hub id (hf backend); with base_url: the served model name", source="required")
    base_url: str | None = setting(None, help="an OpenAI-compatible server (vLLM, SGLang...): the openai backend", source="ours")
    api_key: str | None = setting(
        None, help=f"the server's key (else the config's model.api_key, else ${MODEL_API_KEY_ENV}); never logged", source="OpenAI API"
    )
    backend: str | None = setting(
        None, help="a backend kind of thyme.rollout.registry (default: openai with base_url, else hf)", source="ours"
    )
    config: str | None = setting(
        None, help="thyme YAML config (sections eval, agent, sandbox, model, images: as thyme eval --config)", source="ours"
    )
    suffix: str = setting(
        "auto",
        help="prompt suffix: auto, mcq, yorn, vqa, none, or per task 'TASK:STYLE;PATTERN*:STYLE' (SuffixRule)",
        source="reference VLMEvalKit model (ThymePromptMixin)",
    )
    content: Literal["answer", "full"] = setting(
        "answer", help="what lmms-eval gets: the final answer, or the whole response text (code and sandbox output included)", source="ours"
    )
    concurrency: int | None = setting(None, help="trajectories in flight (default: the config's eval.concurrency, 8)", source="ours")
    min_pixels: int | None = setting(None, help="per-image pixel budget, lower bound (over the config's model section)", source="ours")
    max_pixels: int | None = setting(None, help="per-image pixel budget, upper bound (over the config's model section)", source="ours")
    output_dir: str | None = setting(
        None, help="keep trajectories.jsonl and the sandbox's images here (default: a temporary folder, removed at exit)", source="ours"
    )

    def __post_init__(self) -> None:
        if self.content not in ("answer", "full"):
            raise ThymeError(f"thyme_agent: content must be 'answer' or 'full', got {self.content!r}")
        if self.concurrency is not None and int(self.concurrency) < 1:
            raise ThymeError(f"thyme_agent: concurrency must be at least 1, got {self.concurrency}")
        SuffixRule.parse(self.suffix)  # a bad rule stops before any model loads


_INT_FIELDS = ("concurrency", "min_pixels", "max_pixels")


def parse_model_args(args: dict[str, Any], *, log: Callable[[str], None] | None = None) -> LmmsEvalSettings:
    """lmms-eval's model_args (already split into a dict; values may be ``int``/``float``/``bool``)
    -> :class:`LmmsEvalSettings`.

    Raises:
        ThymeError: an unknown key (naming it and the known ones) or a bad value.
    """
    known = {f.name for f in dataclasses.fields(LmmsEvalSettings)}
    values: dict[str, Any] = {}
    unknown = []
    for k, v in args.items():
        if k in LMMS_EVAL_ARGS:
            if v not in (None, 1, "1", "auto", "cpu", "cuda") and log is not None:
                log(f"thyme_agent: {k}={v!r} is not used (eval.concurrency / concurrency= and the config's model section decide)")
            continue
        if k not in known:
            unknown.append(k)
            continue
        if v is None:
            continue
        if k in _INT_FIELDS:
            try:
                v = int(v)
            except (TypeError, ValueError):
                raise ThymeError(f"thyme_agent: model_arg {k} must be an integer, got {v!r}") from None
        elif not isinstance(v, str):
            v = str(v)  # lmms-eval turns 'model=7' into 7
        values[k] = v
    if unknown:
        raise ThymeError(f"thyme_agent: unknown model_args {unknown}", f"known: {sorted(known)}")
    return LmmsEvalSettings(**values)


# --------------------------------------------------------------------------- the thyme config


@dataclass
class Plan:
    """What :class:`thyme.integrations.lmms_eval.session.AgentSession` runs with.

    Attributes:
        kind: the backend kind (registry name).
        backend_config: its settings (the ``model`` section and the pixel model_args).
        backend_options: ``model``, ``base_url``, ``api_key``, ``concurrency`` as the kind reads them.
        agent: :class:`thyme.agent.AgentConfig`.
        sandbox: :class:`thyme.sandbox.SandboxConfig`.
        concurrency: trajectories in flight.
        schedule: ``auto`` / ``lockstep`` / ``independent`` (as ``thyme eval``).
        local: the backend loads the model in this process.
    """

    kind: str
    backend_config: dict[str, Any]
    backend_options: dict[str, Any]
    agent: Any
    sandbox: Any
    concurrency: int
    schedule: str
    local: bool

    def describe(self) -> dict[str, Any]:
        """The plan without the API key (for logs)."""
        return {
            "backend": self.kind,
            "backend_config": self.backend_config,
            "backend_options": {k: v for k, v in self.backend_options.items() if k != "api_key"},
            "concurrency": self.concurrency,
            "schedule": self.schedule,
        }


def load_sections(path: str | None, *, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The thyme config's sections the plugin uses (``images`` applied to :mod:`thyme.imageio` here).

    Raises:
        ThymeError: unreadable YAML, an unknown section, a section that is not a mapping.
    """
    data = load_yaml(path) if path else {}
    check_sections(data, set(SECTIONS) | set(IGNORED_SECTIONS), str(path))
    for name, section in data.items():
        if section is not None and not isinstance(section, dict):
            raise ThymeError(f"{path}: section '{name}' must be a mapping of settings, got {type(section).__name__}")
    for name in sorted(set(data) & set(IGNORED_SECTIONS)):
        if log is not None:
            log(f"thyme_agent: {path}: section '{name}' is not used under lmms-eval (lmms-eval scores the answers); ignored")
    if data.get("images") is not None:
        from ...imageio import configure_images

        configure_images(data["images"])
    return {k: v for k, v in data.items() if k in SECTIONS}


def plan(settings: LmmsEvalSettings, *, log: Callable[[str], None] | None = None) -> Plan:
    """The backend, agent, sandbox and scheduling of a run: defaults <- the thyme config <- model_args.

    The kind: ``backend=`` when given, else ``openai`` with ``base_url`` (``model`` is then the
    served name), else ``hf`` with ``model``, as ``thyme eval`` chooses from its flags.

    Raises:
        ThymeError: no model given, an unknown kind, a key of the ``model`` section the kind has
            no setting for, a bad value in any section.
    """
    from ...agent import AgentConfig
    from ...evaluate.runner import EvalConfig
    from ...rollout.registry import backend_kind
    from ...sandbox.config import SandboxConfig

    sections = load_sections(settings.config, log=log)
    eval_cfg = build(EvalConfig, sections.get("eval"), section_name="eval")
    unused = sorted(k for k, v in (sections.get("eval") or {}).items() if v is not None and k not in EVAL_KEYS)
    if unused and log is not None:
        log(f"thyme_agent: {settings.config}: eval settings {unused} are not used under lmms-eval (only {', '.join(EVAL_KEYS)})")
    if settings.backend:
        name = settings.backend
    elif settings.base_url:
        name = "openai"
    elif settings.model:
        name = "hf"
    else:
        raise ThymeError(
            "thyme_agent: say which model answers",
            "--model_args model=CHECKPOINT (a local checkpoint or hub id) or base_url=URL,model=NAME (an OpenAI-compatible server)",
        )
    kind = backend_kind(name)
    if kind.name == "openai" and not settings.model:
        raise ThymeError("thyme_agent: base_url needs model=NAME (the model name the server serves)")
    section = dict(sections.get("model") or {})
    cls = kind.config_class() if kind.config is not None else None
    config: dict[str, Any] = {}
    if cls is not None:
        check_keys(cls, section, source="config section 'model'")
        config = {k: v for k, v in section.items() if v is not None}
        names = {f.name for f in dataclasses.fields(cls)}
        for k in ("min_pixels", "max_pixels"):
            v = getattr(settings, k)
            if v is not None:
                if k not in names:
                    raise ThymeError(f"thyme_agent: {k} does not apply to the {kind.name} backend")
                config[k] = v
    elif section:
        config = {k: v for k, v in section.items() if v is not None}
    options: dict[str, Any] = {}
    for o in (kind.option, *kind.reads):
        config.pop(o, None)  # model_args say where and which
        v = getattr(settings, o, None) if o else None
        if v:
            options[o] = v
    if kind.secret is not None:
        key_name, env = kind.secret
        key = settings.api_key or config.get(key_name) or os.environ.get(env) or None
        config.pop(key_name, None)
        if key is not None:
            options[key_name] = key
    concurrency = int(settings.concurrency or eval_cfg.concurrency)
    if cls is not None and "concurrency" in {f.name for f in dataclasses.fields(cls)}:
        options["concurrency"] = int(config.pop("concurrency", None) or concurrency)  # requests in flight, as thyme eval
    return Plan(
        kind=kind.name,
        backend_config=config,
        backend_options=options,
        agent=build(AgentConfig, sections.get("agent"), section_name="agent"),
        sandbox=build(SandboxConfig, sections.get("sandbox"), section_name="sandbox"),
        concurrency=concurrency,
        schedule=eval_cfg.schedule,
        local=kind.local,
    )


# --------------------------------------------------------------------------- the suffix rule


class SuffixRule:
    """Which of the reference's prompt suffixes a doc of an lmms-eval task gets.

    The reference (its VLMEvalKit model) chose the suffix by the dataset's type: multiple choice
    (``MCQ``, ``MMERealWorld``), yes/no (``Y/N``), short answer (``VQA``); texts in
    :mod:`thyme.evaluate.prompts`. lmms-eval has no dataset types, so the rule is, first match wins:

    1. a style given for the task: ``suffix=STYLE`` (every task) or ``suffix=TASK:STYLE;PATTERN*:STYLE``
       (fnmatch patterns over the lmms-eval task name, in the order given);
    2. the built-in table :data:`TASK_STYLES` (tasks whose type the doc does not show: MME and
       MMVet get none, HallusionBench and POPE yes/no);
    3. the doc's form (``auto``): ``mcq`` when the question text lists options (an
       ``Options:`` line, or lines ``A. ...`` / ``(B) ...`` for at least A and B) or the doc has
       an ``options`` / ``choices`` list (or ``A`` and ``B`` fields); else ``vqa``. Yes/no is
       never inferred from a doc (that would need its answer): name those tasks.

    A task's own instruction in its ``doc_to_text`` (lmms-eval's ``post_prompt``) is kept; for
    the reference's exact prompt use a task without one or ``suffix=none``.
    """

    def __init__(self, default: str, per_task: list[tuple[str, str]]):
        self.default = default
        self.per_task = per_task

    @classmethod
    def parse(cls, text: str) -> "SuffixRule":
        """``auto`` / a style / ``TASK:STYLE;PATTERN:STYLE[;...]`` (a bare style in the list sets the default).

        Raises:
            ThymeError: an unknown style, naming the known ones.
        """
        default, per_task = "auto", []
        for item in (p.strip() for p in str(text or "auto").split(";")):
            if not item:
                continue
            pattern, sep, style = item.rpartition(":")
            style = style.strip().lower()
            if style not in (*PROMPT_STYLES, "auto"):
                raise ThymeError(
                    f"thyme_agent: unknown suffix style {style!r} in suffix={text!r}",
                    f"styles: auto, {', '.join(PROMPT_STYLES)}; per task: suffix=TASK:STYLE;PATTERN*:STYLE",
                )
            if sep:
                per_task.append((pattern.strip(), style))
            else:
                default = style
        return cls(default, per_task)

    def style(self, task: str, doc: Any, question: str) -> str:
        """The style for one doc of ``task`` (class docstring)."""
        for pattern, style in self.per_task:
            if fnmatch.fnmatchcase(task, pattern) and style != "auto":
                return style
        if self.default != "auto":
            return self.default
        for pattern, style in TASK_STYLES.items():
            if fnmatch.fnmatchcase(task, pattern):
                return style
        return "mcq" if has_options(question, doc) else "vqa"


def has_options(question: str, doc: Any) -> bool:
    """The question text lists options, or the doc carries them (:class:`SuffixRule`, rule 3)."""
    if _OPTIONS_HEAD.search(question):
        return True
    letters = {m.group(1) for m in _OPTION_LINE.finditer(question)}
    if {"A", "B"} <= letters:
        return True
    if isinstance(doc, dict):
        for key in ("options", "choices"):
            v = doc.get(key)
            if isinstance(v, (list, tuple, dict)) and len(v) >= 2:
                return True
        if isinstance(doc.get("A"), str) and isinstance(doc.get("B"), str):
            return True
    return False
