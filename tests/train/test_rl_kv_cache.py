"""``kv_cache: true`` in the RL config: the HF engine keeps each rollout's KV cache across
rounds and the GRPO trainer drops the caches around every rollout step (they hold the keys and
values of weights the optimiser step is about to change)."""

from __future__ import annotations

from ..conftest import needs_corpus
from .test_grpo import rl_records, small


def test_the_rl_switch_is_off_by_default():
    from thyme.train.rl.config import GRPOATSConfig

    f = GRPOATSConfig.__dataclass_fields__["kv_cache"]
    assert f.default is False and "one at a time" in f.metadata["help"]


@needs_corpus
def test_trainer_uses_and_clears_the_pool(tiny_checkpoint, tmp_path):
    from thyme.train.rl.run import build_trainer

    files = [rl_records(tmp_path / "rl.jsonl", ["thyme-case-1"])]
    trainer = build_trainer(small(tiny_checkpoint, files, tmp_path / "rl", kv_cache=True, max_rounds=2))
    engine = trainer.runner.engine
    assert engine.kv_pool is not None
    cleared = []
    orig = engine.clear_kv_cache

    def clear():
        cleared.append(len(engine.kv_pool.sessions))
        orig()

    engine.clear_kv_cache = clear
    rows = [trainer.train_dataset[0], trainer.train_dataset[0]]
    trainer._generate_and_score_completions(rows)
    assert all(r.mask_reason is None for r in trainer._last), [r.trajectory.error for r in trainer._last]
    st = engine.kv_pool.stats()
    assert st.calls >= 2 and st.prefill_tokens > 0  # the rows generated through the pool
    assert cleared == [0, 2] and engine.kv_pool.sessions == []  # before the step (nothing yet) and after it
