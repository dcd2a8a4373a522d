"""Image-processor results per PIL image, computed once: :class:`VisionCache`, :func:`vision_cache`.

The token driver's pad counts, the HF engine's prefill and the trainer's checks all read the
same processor results (the run's pixel budget), so an image is processed once per step.
"""

from __future__ import annotations

from typing import Any, Sequence


class VisionCache:
    """Image-processor results per PIL image object, computed once (rollout rounds, the pad
    checks and the HF engine's prefill all reuse them).

    Entries are keyed by object identity and hold a weak reference, so an image that the
    rollouts dropped is forgotten (dead entries are purged on each insertion); a new object
    with a recycled ``id`` never hits a stale entry.

    Args:
        image_processor: the policy processor's image processor (the run's pixel budget); the
            same object the training forward uses.

    Methods:
        grid(im) -> (t, h, w) ints: the processor's patch grid of ``im``.
        pad_count(im) -> int: image pad tokens of ``im`` = ``t * h * w // merge_size**2``.
        pixels(images) -> (pixel_values float32 (sum of patches, C * T * P * P), image_grid_thw
            int64 (n, 3)): the processor's output for ``images`` in order (per-image results
            concatenated, which is what the processor returns for a list).

    Cost: one ``image_processor`` call per distinct image (~0.5 s for a 12 MP photo at
    ``max_pixels=2408448`` on CPU) instead of one per use.
    """

    def __init__(self, image_processor: Any):
        self.ip = image_processor
        self.merge = int(getattr(image_processor, "merge_size", 2))
        self._entries: dict[int, tuple[Any, dict[str, Any]]] = {}
        self.misses = 0

    def _entry(self, im: Any) -> dict[str, Any]:
        import weakref

        e = self._entries.get(id(im))
        if e is not None and e[0]() is im:
            return e[1]
        self._entries = {k: v for k, v in self._entries.items() if v[0]() is not None}
        d: dict[str, Any] = {}
        self._entries[id(im)] = (weakref.ref(im), d)
        return d

    def pixels_one(self, im: Any) -> tuple[Any, Any]:
        d = self._entry(im)
        if "pv" not in d:
            self.misses += 1
            out = self.ip(images=[im], return_tensors="pt")
            d["pv"], d["grid"] = out["pixel_values"], out["image_grid_thw"]
        return d["pv"], d["grid"]

    def grid(self, im: Any) -> tuple[int, int, int]:
        d = self._entry(im)
        if "g" not in d:
            d["g"] = tuple(int(x) for x in self.pixels_one(im)[1][0].tolist())
        return d["g"]

    def pad_count(self, im: Any) -> int:
        t, h, w = self.grid(im)
        return t * h * w // (self.merge**2)

    def pixels(self, images: Sequence[Any]) -> tuple[Any, Any]:
        import torch

        pairs = [self.pixels_one(im) for im in images]
        return torch.cat([p for p, _ in pairs], 0), torch.cat([g for _, g in pairs], 0)


_CACHES: dict[int, tuple[Any, VisionCache]] = {}


def vision_cache(processor: Any, *, reset: bool = False) -> VisionCache:
    """The :class:`VisionCache` of ``processor`` (created on first use; ``reset``: a fresh, cold
    one), so the runner, the HF engine and the trainer's checks share one. Kept in a module
    registry (weakly keyed by the processor), not on the processor: ``save_pretrained``
    deep-copies a processor's attributes."""
    import weakref

    for k in [k for k, (ref, _) in _CACHES.items() if ref() is None]:
        del _CACHES[k]
    hit = _CACHES.get(id(processor))
    if not reset and hit is not None and hit[0]() is processor and hit[1].ip is processor.image_processor:
        return hit[1]
    c = VisionCache(processor.image_processor)
    _CACHES[id(processor)] = (weakref.ref(processor), c)
    return c
