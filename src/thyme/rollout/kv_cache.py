"""The HF KV cache across rounds, as the token driver's engines use it.

The implementation lives one floor down, in :mod:`thyme.backends.kv_cache`, because the
message-level HF backend (:class:`thyme.backends.hf.HFBackend`, ``thyme run`` / ``thyme eval
--model``) keeps a cache too and may not import from :mod:`thyme.rollout`; this module re-exports
it for the token driver (:class:`thyme.rollout.engines.hf.HFEngine`) and older imports.
"""

from __future__ import annotations

from ..backends.kv_cache import KVCachePool, KVCacheSession, KVCacheStats, KVGeneration, image_runs

__all__ = ["KVCachePool", "KVCacheSession", "KVCacheStats", "KVGeneration", "image_runs"]
