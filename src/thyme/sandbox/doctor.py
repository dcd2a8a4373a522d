"""``doctor()``: which confinement layers are active here, which modules import in a session, and
which optional libraries (``SandboxConfig.optional_modules``) the sandbox offers."""

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
    :data:`thyme.sandbox.config.LAYERS` first, then one ``module:<name>`` record per module, then
    one ``optional:<package>`` record per top-level package of ``config.optional_modules``
    (active when model code can import it; the detail gives its version and the sub-modules the
    zygote preloaded, or what to install). Never raises for a missing layer (``require`` is
    ignored here); a sandbox that cannot start at all gives a single ``sandbox`` record with the
    reason.
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
        preloaded = sb.optional_modules
        tops = list(dict.fromkeys(m.partition(".")[0] for m in cfg.optional_modules))
        probed = tuple(dict.fromkeys([*modules, *tops]))
        with sb.session() as s:
            r = s.run(_PROBE % (probed,))
        try:
            found = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            found = {m: [False, str(r.error) if r.error else "probe failed"] for m in probed}
        for m in modules:
            ok, detail = found.get(m, [False, "not reported"])
            records.append(Layer(f"module:{m}", bool(ok), str(detail)))
        for top in tops:
            ok, detail = found.get(top, [False, "not reported"])
            records.append(Layer(f"optional:{top}", bool(ok), _optional_detail(top, bool(ok), str(detail), preloaded)))
    return records


def _optional_detail(top: str, ok: bool, detail: str, preloaded: dict[str, tuple[bool, str]]) -> str:
    """One line for an optional package: its version and preloaded sub-modules, or what to install."""
    from thyme.sandbox.config import OPTIONAL_DISTRIBUTIONS

    if not ok:
        dist = OPTIONAL_DISTRIBUTIONS.get(top)
        hint = f"pip install 'thyme[sandbox-extras]' ({dist})" if dist else f"install the package that provides {top!r} into this Python"
        return f"missing ({detail}); {hint}"
    mine = {name: v for name, v in preloaded.items() if name.partition(".")[0] == top}
    done = [name.partition(".")[2] or name for name, (loaded, _) in mine.items() if loaded]
    failed = [f"{name} ({why})" for name, (loaded, why) in mine.items() if not loaded]
    text = f"{detail}; preloaded: {', '.join(done) if done else 'nothing'}"
    return text + (f"; not preloaded: {'; '.join(failed)}" if failed else "")


def format_doctor(records: list[Layer]) -> str:
    """Human-readable table of :func:`doctor` records."""
    width = max((len(r.name) for r in records), default=10)
    lines = []
    for r in records:
        mark = "ok " if r.active else "-- "
        lines.append(f"{mark} {r.name.ljust(width)}  {r.detail}")
    return "\n".join(lines)
