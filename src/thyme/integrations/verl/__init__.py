"""Thyme rollouts inside veRL 0.9 (optional extra ``verl``; its own environment, see the README).

- :mod:`.agent_loop`  ``thyme_agent``: a veRL ``AgentLoopBase`` running the project's rollout core
  (:class:`thyme.rollout.RolloutRunner`), registered on import
- :mod:`.engine`      :class:`VerlServerEngine`: the rollout core's ``Engine`` over veRL's async
  ``server_manager.generate`` (stop-and-resubmit ATS, shared with the TRL vLLM engines)
- :mod:`.reward`      ``compute_score``: the gated Thyme reward as a veRL custom reward function
- :mod:`.data`        ``python -m thyme.integrations.verl.data OUT.parquet IN.jsonl``: veRL rows

Only :mod:`.agent_loop` imports veRL; importing this package imports nothing heavy.
"""
