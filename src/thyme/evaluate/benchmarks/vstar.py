"""V* Bench (Wu & Xie, 2023): 191 questions on high-resolution images, two categories.

Categories ``direct_attributes`` / ``relative_position``; options by VLMEvalKit's rule
(``can_infer``), as the reference evaluated it through VLMEvalKit's ``ImageMCQDataset``.
"""

from __future__ import annotations

from .base import Benchmark
from .registry import register

VSTAR = register(
    Benchmark(
        "vstar",
        "V* Bench",
        "vlmevalkit",
        ("vstarbench", "vstar_bench", "v*", "v*bench"),
        categories=("direct_attributes", "relative_position"),
    )
)
