"""Training on TRL: SFT and GRPO-ATS, and the rewards.

- :mod:`thyme.train.sft`, :mod:`thyme.train.sft_config`, :mod:`thyme.train.collator`: SFT
  (``thyme train sft``: stage 1, math annealing; Thyme's loss masks)
- :mod:`thyme.train.rewards`: format, result and consistency rewards (paper Sec. 3.3), on
  :mod:`thyme.scoring`
- :mod:`thyme.train.rl`: GRPO-ATS (``thyme train rl``): config, data, token-level rollouts, trainer

Floor 4: may use data (masks, records) and evaluate (prompts of benchmark rows); must not
import the report or cli.
"""
