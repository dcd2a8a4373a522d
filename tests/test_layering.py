"""The package's layout as a rule: imports only flow downwards, no two modules import each other.

Floors, from the ground up (README, "Architecture"):

0. ground: ``errors``, ``constants``, ``config``, ``jsonl``, ``imageio``, ``http``, ``protocol``,
   ``records`` (the one Thyme record), ``chat`` (Qwen chat-format constants), ``sandbox``
1. ``scoring``   answer rules and the judge client
2. ``backends``  messages in, the next assistant segment out; ATS processors; the loop detector
3. ``agent``     the one step decision (``agent.step``), ``Trajectory``, the message driver, replay
4. ``rollout``   the token driver, its engines (HF, vLLM), the vision cache (no ``train`` import)
5. ``data``, ``evaluate``, ``train``
6. ``report``, ``integrations`` (veRL: builds on ``rollout`` and ``train.rl``; nothing below imports it),
   ``serve`` (the OpenAI-compatible server over the agent; the cli builds its backend)
7. ``testing``   development servers, tiny checkpoints, scripted models (only the cli and the tests use it)
8. ``cli``       the ``thyme`` command, the only package that builds argparse parsers

Every import counts, also the lazy ones inside functions: a lazy upward import is still a
dependency that a newcomer cannot see in the module's header.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "thyme"

FLOORS = {
    "errors": 0,
    "constants": 0,
    "config": 0,
    "jsonl": 0,
    "imageio": 0,
    "http": 0,
    "protocol": 0,
    "records": 0,
    "chat": 0,
    "sandbox": 0,
    "scoring": 1,
    "backends": 2,
    "agent": 3,
    "rollout": 4,
    "data": 5,
    "evaluate": 5,
    "train": 5,
    "report": 6,
    "integrations": 6,
    "serve": 6,
    "testing": 7,
    "cli": 8,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _imports(path: Path) -> set[str]:
    """Every ``thyme`` module ``path`` imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "thyme")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "thyme":
                continue
            subs = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
            out.update(subs or [target])
    out.discard(mod)
    return out


def _floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else None


GRAPH = {_module_name(p): _imports(p) for p in sorted(PKG.rglob("*.py"))}


def test_every_top_level_module_has_a_floor():
    tops = {m.split(".")[1] for m in GRAPH if m.count(".") >= 1}
    assert tops <= set(FLOORS), f"give these a floor in this test and in README's map: {sorted(tops - set(FLOORS))}"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_upward_import(module):
    mine = _floor(module)
    if mine is None:  # the package's own __init__ names no floor
        return
    up = sorted(t for t in GRAPH[module] if (_floor(t) or 0) > mine)
    assert not up, f"{module} (floor {mine}) imports higher floors: {[(t, _floor(t)) for t in up]}"


def test_no_two_modules_import_each_other():
    """No cycle at all in the module graph (each strongly connected component is one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"modules importing each other (directly or around a loop): {cycles}"


def test_only_the_cli_builds_argument_parsers():
    offenders = []
    for p in PKG.rglob("*.py"):
        if _module_name(p).startswith("thyme.cli"):
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "ArgumentParser":
                offenders.append(_module_name(p))
            if isinstance(node, (ast.Import, ast.ImportFrom)) and any(a.name == "argparse" for a in node.names):
                offenders.append(_module_name(p))
    assert not offenders, f"only thyme.cli may build argparse parsers: {sorted(set(offenders))}"


def test_the_runtime_never_imports_the_testing_package():
    users = sorted(
        m
        for m, deps in GRAPH.items()
        if any(d.startswith("thyme.testing") for d in deps) and not m.startswith(("thyme.testing", "thyme.cli"))
    )
    assert not users, f"runtime modules importing thyme.testing: {users}"


def test_the_checker_sees_violations():
    """The graph is read right: a known downward edge is there (else every test above is vacuous)."""
    assert "thyme.agent.trajectory" in GRAPH["thyme.report.items"]
    assert "thyme.scoring.rules" in GRAPH["thyme.train.rewards"]
    assert any(d.startswith("thyme.backends") for d in GRAPH["thyme.agent.loop"])


def test_the_token_driver_never_imports_the_trainer():
    """``thyme.rollout`` serves veRL, a server and a data generator without the trainer."""
    users = sorted(m for m, deps in GRAPH.items() if m.startswith("thyme.rollout") and any(d.startswith("thyme.train") for d in deps))
    assert not users, f"thyme.rollout modules importing thyme.train: {users}"
    assert any(d.startswith("thyme.agent.step") for d in GRAPH["thyme.rollout.driver"])  # the graph is read (not vacuous)
