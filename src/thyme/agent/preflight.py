"""Checks run before a model is loaded or asked to generate (``thyme run``, ``thyme eval --model``).

Loading a 7B model takes minutes; a bad input found after that wastes them, and one found only
by transformers (a prompt longer than the context) is a warning followed by garbage. So:

- :func:`check_images_decode`: every input image decodes fully (a truncated JPEG has a valid
  header and fails only when its pixels are read);
- :func:`check_prompt_fits`: once the backend (its processor) is there, every first-round
  prompt, image tokens included, leaves room in the model's context for a round of generation.

The sandbox's required layers are checked by starting the sandbox before the model (a
:class:`thyme.sandbox.ConfinementError` names what is missing).

Imports only downwards: errors, imageio, protocol, backends' request type; never data,
evaluate, train, report or cli.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

from .. import protocol
from ..errors import ImageError, ThymeError

#: ``tokenizer.model_max_length`` above this is transformers' "no limit" sentinel.
_NO_LIMIT = 10**9


def check_images_decode(paths: Iterable[str | os.PathLike], *, workers: int = 4) -> None:
    """Decode every image of ``paths`` fully (a few threads: PIL decodes outside the GIL).

    Raises:
        ImageError: for the first image that is missing, unreadable or truncated, naming it
            (and how many others fail too).
    """
    from ..imageio import open_image

    uniq = list(dict.fromkeys(os.fspath(p) for p in paths))

    def one(p: str) -> ImageError | None:
        try:
            with open_image(p, load=True):
                return None
        except ImageError as e:
            return e

    if len(uniq) <= 1:
        errors = [e for e in map(one, uniq) if e is not None]
    else:
        with ThreadPoolExecutor(max(1, min(workers, len(uniq)))) as pool:
            errors = [e for e in pool.map(one, uniq) if e is not None]
    if errors:
        first = errors[0]
        more = f" ({len(errors) - 1} more image(s) fail too)" if len(errors) > 1 else ""
        raise type(first)(first.message + more, first.hint)  # an ImageBudgetError stays one


def context_limit(backend: Any) -> int | None:
    """The most tokens the backend's model takes (context window), or ``None`` when unknown.

    The smaller of the tokenizer's ``model_max_length`` and the model config's
    ``max_position_embeddings`` (its text config for vision-language models).
    """
    limits = []
    tok = getattr(backend, "tokenizer", None)
    n = getattr(tok, "model_max_length", None)
    if isinstance(n, int) and 0 < n < _NO_LIMIT:
        limits.append(n)
    cfg = getattr(getattr(backend, "model", None), "config", None)
    for c in (getattr(cfg, "text_config", None), cfg):
        m = getattr(c, "max_position_embeddings", None)
        if isinstance(m, int) and m > 0:
            limits.append(m)
            break
    return min(limits) if limits else None


def prompt_tokens(backend: Any, question: str, images: list[str], agent_cfg: Any) -> int | None:
    """Tokens of the first-round prompt of ``question`` (image tokens included), or ``None``
    when the backend cannot count them (only local transformers backends can)."""
    if not (hasattr(backend, "prepare") and hasattr(backend, "encode")):
        return None
    from ..backends.base import GenerationRequest
    from ..imageio import image_size

    shown_tpl = getattr(agent_cfg, "shown_path", None)
    shown = [p if shown_tpl is None else shown_tpl.replace("{name}", os.path.basename(p)).replace("{path}", p) for p in images]
    messages = protocol.build_messages(question, images, shown_paths=shown, image_sizes=[image_size(p) for p in images])
    prefill = getattr(agent_cfg, "prefill", "") or ""
    req = GenerationRequest(messages=messages, assistant_parts=[{"type": "text", "text": prefill}] if prefill else [], max_new_tokens=1, stop=[])
    enc = backend.encode([backend.prepare(req)])
    return int(enc["input_ids"].shape[-1])


def check_prompt_fits(backend: Any, items: Iterable[tuple[str, str, list[str]]], agent_cfg: Any, *, limit: int | None = None) -> None:
    """Refuse prompts that leave no room for a round of generation in the model's context.

    Args:
        backend: the loaded backend (a transformers one; others are not checked).
        items: ``(name, question, images)`` of each trajectory to run.
        agent_cfg: the :class:`thyme.agent.AgentConfig` (``max_new_tokens``, ``max_total_tokens``,
            ``shown_path``, ``prefill``).
        limit: the context in tokens (default :func:`context_limit`).

    Raises:
        ThymeError: naming the question, its prompt length, the context and the round's budget.
    """
    limit = limit if limit is not None else context_limit(backend)
    if limit is None:
        return
    room = max(1, min(int(getattr(agent_cfg, "max_new_tokens", 1)), int(getattr(agent_cfg, "max_total_tokens", 1))))
    for name, question, images in items:
        n = prompt_tokens(backend, question, list(images), agent_cfg)
        if n is None:
            return
        if n + room > limit:
            raise ThymeError(
                f"the prompt of {name} is {n} tokens (question of {len(question)} characters, {len(images)} image(s)); "
                f"with {room} new tokens per round it does not fit the model's context of {limit} tokens",
                "shorten the question, lower --max-pixels (fewer image tokens), or lower --max-new-tokens",
            )
