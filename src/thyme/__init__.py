"""thyme: Think Beyond Images (arXiv 2508.11630).

A vision-language model answers a question about an image by reasoning in text and
writing Python that a sandbox runs; the results return into its context until it answers.

Layout (each module one job, imports only flow downwards):

- :mod:`thyme.protocol`  prompts, segment grammar, answer extraction, sandbox feedback
- :mod:`thyme.sandbox`   isolated execution of model code (warm pool, sessions, repairs)
- :mod:`thyme.backends`  turn messages into the next assistant segment (hf, replay)
- :mod:`thyme.agent`     the multi-turn loop and the ``Trajectory`` record
- :mod:`thyme.agent.replay`    re-executing recorded Thyme trajectories
- :mod:`thyme.cli`       the ``thyme`` command
"""

__version__ = "0.1.0"
