"""``thyme_agent``: the lmms-eval model class (imports lmms-eval; loaded only by lmms-eval's registry).

``python -m lmms_eval --model thyme_agent --model_args model=CKPT[,config=thyme.yaml,...] --tasks ...``
(model_args: :mod:`thyme.integrations.lmms_eval.settings`). A chat model (``is_simple =
False``): each request's ``doc_to_messages`` gives the images and the question; the reference's
suffix of its task is added (:class:`~thyme.integrations.lmms_eval.settings.SuffixRule`); the
whole Thyme loop runs per doc (:class:`~thyme.integrations.lmms_eval.session.AgentSession`:
the agent, sandbox and scheduler of ``thyme eval``); the final answer is what lmms-eval scores.

The task's ``generation_kwargs`` (``max_new_tokens``, ``temperature``, ``until``) are not used:
decoding is the thyme config's ``agent`` section (default: the reference's evaluation, greedy,
up to 5 rounds of 2048 tokens), because a task's answer-sized token cap would cut the reasoning.
"""

from __future__ import annotations

import weakref
from typing import Any

from lmms_eval.api.model import lmms
from loguru import logger as eval_logger

from .session import AgentSession, Item
from .settings import parse_model_args


class ThymeAgent(lmms):
    """The Thyme agent as an lmms-eval chat model (module docstring).

    Args:
        **model_args: lmms-eval's ``--model_args`` (and its ``batch_size`` / ``device``, unused).

    Raises:
        ThymeError: bad model_args or config, a backend that cannot be built or reached.
    """

    is_simple = False

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        settings = parse_model_args(model_args, log=eval_logger.warning)
        self.session = AgentSession(settings, log=eval_logger.info, error_log=eval_logger.error)
        self._finalizer = weakref.finalize(self, AgentSession.close, self.session)
        self._warned_kwargs = False

    def close(self) -> None:
        """Close the session now (it is closed at exit otherwise)."""
        self._finalizer()

    def generate_until(self, requests: list[Any]) -> list[str]:
        """One answer per request, in order (``""`` for a doc that failed; its error is logged)."""
        items: list[Item] = []
        seen: dict[str, int] = {}
        for req in requests:
            ctx, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
            base = f"{task}/{split}/{doc_id}"
            seen[base] = seen.get(base, 0) + 1
            key = base if seen[base] == 1 else f"{base}#{seen[base]}"
            if gen_kwargs and not self._warned_kwargs:
                self._warned_kwargs = True
                eval_logger.info(
                    f"thyme_agent: the task's generation_kwargs {sorted(gen_kwargs)} are not used; decoding follows the thyme config's agent section"
                )
            try:
                doc = self.task_dict[task][split][doc_id]
            except Exception as e:  # noqa: BLE001 - the doc is answered "" and logged by the session
                items.append(Item(key, error=f"doc {doc_id} of {task}/{split} not found ({type(e).__name__}: {e})", meta={"task": task}))
                continue
            items.append(
                self.session.item(
                    key,
                    task,
                    doc,
                    lambda d=doc, f=doc_to_messages: f(d),
                    meta={"split": str(split), "doc_id": doc_id if isinstance(doc_id, (int, str)) else str(doc_id)},
                )
            )
        return self.session.answer(items)

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError(
            "thyme_agent runs the whole Thyme loop in one generate_until call per doc (its own rounds: code, sandbox, feedback); "
            "multi-round lmms-eval tasks are not supported: use a generate_until task"
        )

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "thyme_agent generates answers and cannot score continuations; for loglikelihood tasks use an lmms-eval model "
            "over the same checkpoint (e.g. --model qwen2_5_vl) or a generate_until variant of the task"
        )
