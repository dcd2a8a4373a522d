"""Loop detection during generation: a Rabin-Karp rolling hash over token ids.

The paper (Sec. 3.3) stops looping generations with Rabin-Karp rolling hashes; the reference
code has none (it counts substrings of the last 1000 characters after each round, quadratic in
the tail, and only blanks the segment). This module keeps the paper's method:

**Rule.** A sequence loops when one span of ``span`` consecutive items (token ids, or character
codes for text) occurs ``repeats`` times within the last ``window`` items. The span's
polynomial hash is rolled forward in O(1) per item; a table counts the hashes of the spans that
start inside the window (evicted as the window slides); a hit is confirmed by comparing the
items themselves (so a hash collision never stops a generation).

Default (one rule for every driver: ``thyme run`` / ``thyme eval`` through
:class:`thyme.agent.AgentConfig`, RL through the rollout settings): ``span=32, repeats=3,
window=1024`` over generated token ids (a 32-token run seen three times in the last 1024
tokens: a loop of any period up to ~500 tokens is caught after two repeats of its first 32
tokens). Backends that return text only apply the same rule to the characters of a segment that
ran out of tokens (:func:`thyme.agent.step.loop_finish`). :data:`TEXT_RULE` (64 characters,
the reference's 1000-character window) is kept for the benchmarks' comparison only.

**Cost.** O(1) amortised per item: one multiply-add-modulo for the hash, one dictionary update
and one eviction; memory O(window). ``benchmarks/rollout.py`` measures it per token against the
reference's substring count.

Pure Python; no thyme imports (usable by backends, the agent loop and the RL rollout).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable, Sequence

_MOD = (1 << 61) - 1
_BASE = 1_000_003


@dataclass(frozen=True)
class RepetitionRule:
    """Window, minimum span and repeats of the loop test (see the module docstring).

    Attributes:
        span: items per compared span (tokens or characters); >= 1.
        repeats: occurrences of one span within the window that make a loop; >= 2.
        window: items looked back over; at least ``span * repeats``.
    """

    span: int = 32
    repeats: int = 3
    window: int = 1024

    def __post_init__(self) -> None:
        if self.span < 1 or self.repeats < 2 or self.window < self.span * self.repeats:
            raise ValueError(f"bad repetition rule {self}: need span >= 1, repeats >= 2, window >= span * repeats")


#: The default rule (every driver; see the module docstring).
TOKEN_RULE = RepetitionRule(span=32, repeats=3, window=1024)
#: The former post-hoc character rule of the agent loop (benchmarks only).
TEXT_RULE = RepetitionRule(span=64, repeats=3, window=1000)


class RepetitionDetector:
    """Incremental loop detector over a stream of integers.

    Feed items with :meth:`push` (one) or :meth:`extend` (many); :attr:`looping` becomes true
    (and stays true) once the rule fires. :meth:`reset` starts a new segment.

    Args:
        rule: :class:`RepetitionRule`.
    """

    def __init__(self, rule: RepetitionRule = TOKEN_RULE):
        self.rule = rule
        self._pow = pow(_BASE, rule.span - 1, _MOD)
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new segment)."""
        self._items: deque[int] = deque()  # the last window + span items
        self._hash = 0
        self._n = 0  # items pushed
        self._starts: deque[tuple[int, int]] = deque()  # (start index, hash) of spans in the window
        self._count: dict[int, list[int]] = {}
        self.looping = False
        self.pushed = 0

    def push(self, item: int) -> bool:
        """Add one item; returns :attr:`looping`."""
        r = self.rule
        item = int(item) & 0xFFFFFFFF
        self.pushed += 1
        if self.looping:
            return True
        self._items.append(item)
        self._n += 1
        if len(self._items) > r.span:
            out = self._items[-r.span - 1]
            self._hash = (self._hash - (out + 1) * self._pow) % _MOD
        self._hash = (self._hash * _BASE + item + 1) % _MOD
        keep = r.window + r.span
        while len(self._items) > keep:
            self._items.popleft()
        if self._n < r.span:
            return False
        start = self._n - r.span
        # evict spans that started before the window
        while self._starts and self._starts[0][0] < self._n - r.window:
            s0, h0 = self._starts.popleft()
            lst = self._count.get(h0)
            if lst:
                lst.remove(s0)
                if not lst:
                    del self._count[h0]
        lst = self._count.setdefault(self._hash, [])
        self._starts.append((start, self._hash))
        if len(lst) + 1 >= r.repeats:
            confirmed = sum(1 for s in lst if self._same(s, start))
            if confirmed + 1 >= r.repeats:
                self.looping = True
        lst.append(start)
        return self.looping

    def extend(self, items: Iterable[int]) -> bool:
        """Add many items; returns :attr:`looping`."""
        for x in items:
            if self.push(x):
                return True
        return self.looping

    def _same(self, a: int, b: int) -> bool:
        """Whether the spans starting at absolute positions ``a`` and ``b`` hold the same items."""
        base = self._n - len(self._items)
        span = self.rule.span
        ia, ib = a - base, b - base
        if ia < 0:
            return False
        items = self._items
        return all(items[ia + k] == items[ib + k] for k in range(span))


def sequence_loops(items: Sequence[int], rule: RepetitionRule = TOKEN_RULE) -> bool:
    """Whether ``items`` (token ids) loop anywhere by :class:`RepetitionRule` (a fresh detector)."""
    return RepetitionDetector(rule).extend(items)


def text_loops(text: str, rule: RepetitionRule = TEXT_RULE) -> bool:
    """Whether ``text`` loops, over its characters (for backends that return text only)."""
    return RepetitionDetector(rule).extend(ord(c) for c in text)


def substring_count_reference(s: str, threshold: float = 0.3, tail_length: int = 1000) -> bool:
    """The reference's post-hoc check (``has_repeated_content``), re-implemented from its
    description for cost comparison only (benchmarks): on the last ``tail_length`` characters
    (``n`` of them; ``n < 50`` is never a loop), for each span length ``L`` from ``n // 3`` down
    while ``2 * L / n > threshold``, count every length-``L`` substring; a substring seen at
    least twice with ``count * L / n > threshold`` is a loop.

    Cost: O(n^2 x (1/3 - threshold/2)) characters sliced and hashed per check (about 180 span
    lengths x 850 substrings of ~250 characters at the defaults), once per generated segment.
    """
    t = s[-tail_length:]
    n = len(t)
    if n < 50:
        return False
    for length in range(n // 3, 0, -1):
        if 2 * length / n <= threshold:
            break
        counts: dict[str, int] = {}
        for i in range(n - length + 1):
            sub = t[i : i + length]
            counts[sub] = counts.get(sub, 0) + 1
        if any(c > 1 and c * length / n > threshold for c in counts.values()):
            return True
    return False


class RepetitionStoppingCriteria:
    """A transformers stopping criterion: row ``b`` stops once its generated ids loop.

    ``generate`` calls it with ``input_ids`` ``(B, L)`` int64 after each step; the first call
    sees ``prompt_len + 1`` columns. Rows already found looping stay stopped. :attr:`flags`
    (one bool per row) tells the caller which rows ended by repetition.

    Args:
        prompt_len: columns of the (left-padded) prompt.
        batch_size: rows.
        rule: :class:`RepetitionRule`, or one per row.
    """

    def __init__(self, prompt_len: int, batch_size: int, rule: RepetitionRule | Sequence[RepetitionRule] = TOKEN_RULE):
        self.prompt_len = prompt_len
        rules = [rule] * batch_size if isinstance(rule, RepetitionRule) else list(rule)
        if len(rules) != batch_size:
            raise ValueError(f"{len(rules)} repetition rules for {batch_size} rows")
        self.detectors = [RepetitionDetector(r) for r in rules]
        self.flags = [False] * batch_size
        self._seen = 0

    def __call__(self, input_ids, scores=None, **kwargs):
        import torch

        n = input_ids.shape[1] - self.prompt_len
        new = input_ids[:, self.prompt_len + self._seen :].tolist()
        self._seen = n
        for b, row in enumerate(new):
            if not self.flags[b] and self.detectors[b].extend(row):
                self.flags[b] = True
        return torch.tensor(self.flags, dtype=torch.bool, device=input_ids.device)
