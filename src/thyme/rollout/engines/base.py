"""The engine interface of the token driver: rows of token ids in, sampled ids out.

:class:`Engine` continues :class:`EngineRow` s (token ids with image pads expanded, their PIL
images) under :class:`SamplingSettings` and returns one :class:`EngineOutput` each (ids as
sampled, their sampling log-probs, the finish: ``stop`` / ``eos`` / ``length`` /
``repetition``). Engines: :mod:`thyme.rollout.engines.hf`, :mod:`thyme.rollout.engines.vllm`,
veRL's server manager (:mod:`thyme.integrations.verl.engine`).
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field
from typing import Any

from ... import protocol
from ...backends.repetition import TOKEN_RULE, RepetitionRule

NAN = float("nan")


@dataclass
class SamplingSettings:
    """Decoding of one rollout batch (GRPO-ATS: ``temperature`` outside code, greedy inside when ``ats``)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    ats: bool = True
    stop: tuple[str, ...] = tuple(protocol.STOP_STRINGS)
    seed: int | None = None
    repetition: RepetitionRule = TOKEN_RULE


@dataclass
class EngineRow:
    """One continuation request.

    Attributes:
        ids: prompt + completion so far (token ids, image pads expanded).
        images: every image of ``ids`` in order (PIL RGB), for the vision tower.
        max_new_tokens: cap of this call.
        code_open: the context ends inside an open ``<code>`` block (ATS starts greedy).
        seed: this row's sampling seed (engines that seed per request: vLLM); ``None``: the
            batch's :attr:`SamplingSettings.seed`. Rows of one group get distinct seeds
            (:func:`row_seed`), else a seeded engine returns G identical rollouts.
    """

    ids: list[int]
    images: list[Any]
    max_new_tokens: int
    code_open: bool = False
    seed: int | None = None


@dataclass
class EngineOutput:
    """Generated ids of one call.

    Attributes:
        token_ids: as sampled, through the token completing the stop string / the EOS token.
        logprobs: one per token (sampling distribution); NaN where forced greedy (ATS).
        finish: ``stop`` / ``eos`` / ``length`` / ``repetition``.
        calls: engine calls used (HF: 1; stop-and-resubmit ATS: one per temperature switch).
        forced: 0-based positions in ``token_ids`` chosen greedily by ATS.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish: str
    calls: int = 1
    forced: list[int] = field(default_factory=list)


def row_seed(base: int, rollout_id: str, round_index: int) -> int:
    """The seed of one rollout's ``round_index``-th engine call: a 31-bit hash of (``base``,
    ``rollout_id``, ``round_index``): reproducible per row (the same run gives the same
    rollout), distinct across the rows of a group (ids ``prompt#k``) and across rounds."""
    h = hashlib.blake2b(f"{int(base)}\x00{rollout_id}\x00{int(round_index)}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "big") & 0x7FFFFFFF


class Engine(abc.ABC):
    """Continues token-id rows (all rows of a step in one batch).

    An engine whose ``early_stops`` is True also takes ``on_stop=callback`` in :meth:`generate`:
    ``callback(b, token_ids)`` is called, during the call, once per row ``b`` whose segment ends
    at a stop string, with the row's tokens up to it (exactly the ``token_ids`` of its later
    output), so the caller can start that row's code while the other rows keep generating.
    """

    name = "engine"
    early_stops = False

    @abc.abstractmethod
    def generate(self, rows: list[EngineRow], settings: SamplingSettings) -> list[EngineOutput]:
        """One output per row, in order. May raise: the caller masks the affected rollouts."""
