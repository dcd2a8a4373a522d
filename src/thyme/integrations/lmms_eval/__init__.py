"""Thyme as an lmms-eval model plugin: ``--model thyme_agent`` (lmms-eval 0.7.x; docs/lmms-eval.md).

Registered through lmms-eval's entry-point group ``lmms_eval.models`` (pyproject.toml:
``thyme_agent = "thyme.integrations.lmms_eval:manifests"``): lmms-eval loads :func:`manifests`
and imports :class:`thyme.integrations.lmms_eval.model.ThymeAgent` when the model is asked for.
The name is not ``thyme``: lmms-eval ships a ``thyme`` model of its own (the reference's
in-process sandbox on its Qwen2.5-VL class), which this plugin does not replace.

- :mod:`.settings`  model_args, the thyme config (sections of ``thyme eval --config``), the
  backend plan (:mod:`thyme.rollout.registry`), the per-task prompt suffix rule
- :mod:`.session`   :class:`AgentSession`: the sandbox, backend and agent of a run; docs through
  ``thyme eval``'s scheduler; per-doc failures answered ``""`` and logged
- :mod:`.model`     :class:`ThymeAgent`, the ``lmms`` subclass (the only module importing lmms-eval)

Importing this package imports neither lmms-eval nor a model.
"""

from __future__ import annotations

from typing import Any

from .settings import MODEL_NAME

__all__ = ["CLASS_PATH", "MODEL_NAME", "manifests"]

#: The model class lmms-eval imports for ``--model thyme_agent``.
CLASS_PATH = "thyme.integrations.lmms_eval.model.ThymeAgent"


def manifests() -> list[Any]:
    """The entry point's payload: one ``ModelManifest`` (a chat model named :data:`MODEL_NAME`).

    Raises:
        ImportError: lmms-eval is not installed (only lmms-eval calls this).
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, chat_class_path=CLASS_PATH)]
