"""thyme: Think Beyond Images (arXiv 2508.11630).

A vision-language model answers a question about an image by reasoning in text and
writing Python that a sandbox runs; the results return into its context until it answers.

Layout by data flow, floors from the ground up (each imports only from floors below it):

0. :mod:`thyme.protocol` (prompts, segment grammar, feedback), :mod:`thyme.sandbox` (isolated
   execution), and the ground helpers :mod:`~thyme.constants`, :mod:`~thyme.config`,
   :mod:`~thyme.errors`, :mod:`~thyme.jsonl`, :mod:`~thyme.imageio`, :mod:`~thyme.http`
1. :mod:`thyme.scoring`   answer extraction, option matching, rule sets, the judge client
2. :mod:`thyme.backends`  messages in, the next assistant segment out (hf, openai, replay)
3. :mod:`thyme.agent`     the multi-turn loop, the ``Trajectory`` record, replay
4. :mod:`thyme.data`, :mod:`thyme.evaluate`, :mod:`thyme.train`  data, benchmarks, SFT and GRPO-ATS
5. :mod:`thyme.report`    the HTML trajectory report
6. :mod:`thyme.testing`   tiny checkpoints and dev servers (never imported by the runtime)
7. :mod:`thyme.cli`       the ``thyme`` command
"""

__version__ = "0.1.0"
