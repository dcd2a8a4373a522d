"""Thyme inside other training frameworks (floor 5, beside ``report``).

- :mod:`thyme.integrations.verl`  Thyme rollouts as a veRL 0.9 agent loop (``thyme_agent``), a
  veRL custom reward function and a parquet converter (optional extra ``verl``).
- :mod:`thyme.integrations.lmms_eval`  ``thyme_agent``: the Thyme agent as an lmms-eval model
  plugin (entry point ``lmms_eval.models``; lmms-eval in its own environment).

Builds on :mod:`thyme.train.rl` (one rollout core: :class:`thyme.rollout.RolloutRunner`
with an engine adapter per framework). Nothing in the runtime, data, evaluate, train or report
imports this package; the third-party framework is imported only by the modules that subclass it.
"""
