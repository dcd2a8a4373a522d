"""The backend / engine registry (``thyme.rollout.registry``): names to factories, resolved
lazily; a table chooses the backend, so no command branches on backend names."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from thyme.errors import ThymeError
from thyme.rollout import registry
from thyme.rollout.registry import Registry, build_backend, build_engine, register_backend, register_engine, select_backend

SRC = Path(__file__).resolve().parents[2] / "src" / "thyme"


# --------------------------------------------------------------------------- the mechanism


def test_unknown_kinds_are_a_clear_error_listing_the_known_ones():
    with pytest.raises(ThymeError, match=r"unknown backend 'vllm'; known backends: hf, openai, replay"):
        build_backend("vllm")
    with pytest.raises(ThymeError, match=r"unknown engine 'sglang'; known engines: hf, vllm_colocate, vllm_server"):
        build_engine("sglang")


def test_an_engine_registered_by_path_is_imported_only_when_built(tmp_path, monkeypatch):
    (tmp_path / "thyme_test_plugin_engine.py").write_text(
        "class Engine:\n    def __init__(self, *args, **kw):\n        self.args, self.kw = args, kw\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    register_engine("dummy", "thyme_test_plugin_engine:Engine")
    try:
        assert "dummy" in registry.engine_kinds()
        assert "thyme_test_plugin_engine" not in sys.modules  # registering imports nothing
        eng = build_engine("dummy", 1, rows=2)
        assert type(eng).__module__ == "thyme_test_plugin_engine" and (eng.args, eng.kw) == ((1,), {"rows": 2})
        with pytest.raises(ValueError, match="already registered"):
            register_engine("dummy", "thyme_test_plugin_engine:Engine")
    finally:
        registry.ENGINES.unregister("dummy")
        sys.modules.pop("thyme_test_plugin_engine", None)


def test_a_path_that_does_not_import_names_the_module_and_the_missing_piece():
    reg = Registry("engine")
    reg.register("broken", "thyme_no_such_module_anywhere:Engine")
    reg.register("typo", "thyme.errors:NoSuchClass")
    with pytest.raises(ThymeError, match="cannot import thyme_no_such_module_anywhere"):
        reg.get("broken")
    with pytest.raises(ThymeError, match="thyme.errors has no attribute 'NoSuchClass'"):
        reg.get("typo")
    with pytest.raises(ThymeError, match="bad factory path"):
        registry.resolve("no-colon")


def test_every_built_in_engine_is_built_from_one_context():
    """The RL runner never branches on the engine's name: one EngineContext builds each kind."""
    from types import SimpleNamespace

    from thyme.rollout.engines.hf import HFEngine
    from thyme.rollout.engines.vllm import VLLMColocateEngine, VLLMServerEngine
    from thyme.rollout.registry import EngineContext

    tok = SimpleNamespace(convert_tokens_to_ids=lambda t: 7, unk_token_id=0, decode=lambda ids, **k: "")
    proc = SimpleNamespace(tokenizer=tok, image_processor=SimpleNamespace(merge_size=2))
    ctx = EngineContext(model=object(), processor=proc, suppress_ids=(5, 6), eos_ids=(9,), pad_id=9, llm=object(), client=object())
    built = {k: build_engine(k, ctx) for k in ("hf", "vllm_colocate", "vllm_server")}
    assert type(built["hf"]) is HFEngine
    assert type(built["vllm_colocate"]) is VLLMColocateEngine
    assert type(built["vllm_server"]) is VLLMServerEngine
    assert built["vllm_colocate"].llm is ctx.llm and built["vllm_server"].client is ctx.client


# --------------------------------------------------------------------------- backends


def test_build_backend_replay_plays_the_responses_back():
    from thyme.backends.base import GenerationRequest
    from thyme.backends.replay import ReplayBackend

    b = build_backend("replay", {"q1": "<think>x</think><answer>B</answer>"})
    assert isinstance(b, ReplayBackend)
    (g,) = b.generate([GenerationRequest(messages=[], key="q1", round=0, stop=[])])
    assert g.text.endswith("<answer>B</answer>")
    with pytest.raises(ThymeError, match="needs the recorded responses"):
        build_backend("replay", replay="records.jsonl")


def test_build_backend_openai_takes_a_config_or_the_given_settings():
    pytest.importorskip("httpx")
    from thyme.backends.openai import OpenAIBackend, OpenAIConfig

    with build_backend("openai", OpenAIConfig(base_url="http://127.0.0.1:9/v1", model="m", timeout_s=7)) as b:
        assert isinstance(b, OpenAIBackend) and (b.config.model, b.config.timeout_s) == ("m", 7)
    with build_backend("openai", {"timeout_s": 3, "max_pixels": None}, base_url="http://127.0.0.1:9", model="served", concurrency=2) as b:
        assert (b.config.base_url, b.config.model, b.config.timeout_s, b.config.concurrency) == ("http://127.0.0.1:9/v1", "served", 3, 2)
        assert b.config.max_pixels == OpenAIConfig().max_pixels  # None keeps the default
    with pytest.raises(ThymeError, match="served model name"):
        build_backend("openai", {}, base_url="http://127.0.0.1:9/v1")


def test_a_plugin_backend_is_built_and_chosen_by_its_option():
    made = {}

    def factory(config, **options):
        made.update(config=config, **options)
        return "a backend"

    register_backend("echo", factory, option="echo_url", usage="--echo-url URL")
    try:
        assert build_backend("echo", {"x": 1}, echo_url="u") == "a backend" and made == {"config": {"x": 1}, "echo_url": "u"}
        assert select_backend({"echo_url": "u", "model": None}).name == "echo"
    finally:
        registry.BACKENDS.unregister("echo")


@pytest.mark.parametrize(
    "options, kind",
    [({"model": "Kwai-Keye/Thyme-RL"}, "hf"), ({"base_url": "http://h/v1", "model": "served"}, "openai"), ({"replay": "r.jsonl"}, "replay")],
)
def test_the_options_select_one_kind(options, kind):
    assert select_backend(options, kinds=("hf", "openai", "replay")).name == kind


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "exactly one of --model ID, --base-url URL --model NAME, or --replay RECORDS"),
        ({"model": "m", "replay": "r"}, "(got --replay, --model)"),
        ({"base_url": "u", "model": "m", "replay": "r"}, "(got --replay, --base-url)"),
        ({"base_url": "u"}, "--base-url needs --model NAME"),
    ],
)
def test_none_several_or_incomplete_is_a_clear_error(options, message):
    with pytest.raises(ThymeError) as e:
        select_backend(options, kinds=("hf", "openai", "replay"))
    assert message in str(e.value)


def test_a_command_offers_only_its_kinds():
    with pytest.raises(ThymeError, match="exactly one of --model ID, or --base-url URL --model NAME"):
        select_backend({"replay": "r"}, kinds=("hf", "openai"))


def _backend_name_branches(source: str) -> list[int]:
    """Lines of ``source`` comparing something with a registered backend name."""
    names = set(registry.backend_kinds())
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            consts += [e for c in node.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set)) for e in c.elts if isinstance(e, ast.Constant)]
            if any(c.value in names for c in consts):
                hits.append(node.lineno)
    return hits


def test_no_command_or_eval_branches_on_backend_names():
    """The registry's table chooses the backend: cli/ and evaluate/ compare no string with a
    backend name (``== "hf"``, ``in ("openai", ...)``)."""
    assert _backend_name_branches('if kind == "openai":\n    pass\nif x in ("a", "replay"):\n    pass\n') == [1, 3]  # the check sees them
    hits = [f"{p.relative_to(SRC)}:{n}" for d in ("cli", "evaluate") for p in sorted((SRC / d).rglob("*.py")) for n in _backend_name_branches(p.read_text(encoding="utf-8"))]
    assert not hits, hits
