"""``doctor()``: which confinement layers are active here, and which modules import in a session."""

from __future__ import annotations

import json
from typing import Any

from thyme.sandbox.confine import Layer

#: Modules model code commonly imports; each is imported inside a confined session.
MODULES = ("numpy", "cv2", "PIL", "sympy", "scipy", "matplotlib")

_PROBE = """
import importlib, json
out = {}
for name in %r:
    try:
        m = importlib.import_module(name)
        if name == "matplotlib":
            import matplotlib.pyplot
        out[name] = [True, str(getattr(m, "__version__", "imported"))]
    except BaseException as e:
        out[name] = [False, f"{type(e).__name__}: {e}"]
print(json.dumps(out))
"""


def doctor(config: Any = None, modules: tuple[str, ...] = MODULES, **overrides: Any) -> list[Layer]:
    """Start a sandbox, report its layers (as measured in a session) and module imports.

    Returns records ``Layer(name, active, detail)``: the layers of
    :data:`thyme.sandbox.config.LAYERS` first, then one ``module:<name>`` record per module.
    Never raises for a missing layer (``require`` is ignored here); a sandbox that cannot start
    at all gives a single ``sandbox`` record with the reason.
    """
    from thyme.sandbox.config import SandboxConfig
    from thyme.sandbox.errors import SandboxError
    from thyme.sandbox.sandbox import Sandbox

    cfg = (config or SandboxConfig()).with_overrides(require=(), **overrides)
    try:
        sb = Sandbox(cfg)
    except SandboxError as e:
        return [Layer("sandbox", False, str(e))]
    with sb:
        records = list(sb.layers)
        with sb.session() as s:
            r = s.run(_PROBE % (tuple(modules),))
        try:
            found = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            found = {m: [False, str(r.error) if r.error else "probe failed"] for m in modules}
        for m in modules:
            ok, detail = found.get(m, [False, "not reported"])
            records.append(Layer(f"module:{m}", bool(ok), str(detail)))
    return records


def format_doctor(records: list[Layer]) -> str:
    """Human-readable table of :func:`doctor` records."""
    width = max((len(r.name) for r in records), default=10)
    lines = []
    for r in records:
        mark = "ok " if r.active else "-- "
        lines.append(f"{mark} {r.name.ljust(width)}  {r.detail}")
    return "\n".join(lines)
