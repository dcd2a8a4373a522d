"""Scoring: the one place that reads answers out of model text and judges them.

- :mod:`thyme.scoring.answers`    final-answer extraction, prefix stripping, normal forms, printed-text equality
- :mod:`thyme.scoring.options`    option matching: VLMEvalKit's ``can_infer``, MME-RealWorld's rule, Thyme's answer style
- :mod:`thyme.scoring.mathequiv`  math equivalence (math-verify; main thread only)
- :mod:`thyme.scoring.rules`      named rule sets (``vlmevalkit``, ``mme``, ``thyme``, ``strict``) -> :class:`Verdict`
- :mod:`thyme.scoring.judge`      the LLM-judge client for any OpenAI-compatible server
- :mod:`thyme.scoring.crops`      crop regions read from model code; how much of a target box they cover

Benchmark metrics (:mod:`thyme.evaluate`), the report (:mod:`thyme.report`) and the RL rewards
(:mod:`thyme.train.rewards`) all call these, so they cannot disagree on a prediction. Floor:
above the protocol, below backends and everything else; must not import the agent, backends,
data, evaluate, train, report or cli.
"""

from .answers import answer_part, final_answer, normalise_answer, strip_prefixes, texts_match
from .rules import RULE_SETS, Verdict, score_answer

__all__ = ["RULE_SETS", "Verdict", "answer_part", "final_answer", "normalise_answer", "score_answer", "strip_prefixes", "texts_match"]
