"""GRPO-ATS (paper Sec. 3.3) on TRL 1.16: config, data, token-level rollouts, trainer, entry."""
