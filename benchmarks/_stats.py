"""Figures the benchmark scripts share (imported as ``_stats``: each script's folder is on ``sys.path``)."""

from __future__ import annotations

import math

import numpy as np


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linearly interpolated (numpy's default);
    nan when there are none."""
    return float(np.percentile(values, q)) if len(values) else math.nan
