"""Threat class "RL runs with whatever sandbox it gets": ``thyme train rl`` and the veRL agent
loop run the most model-written code of any stage, so their sandbox requires every confinement
layer by default, and a host that lacks one stops the run *before the model loads* (before any
rollout, for veRL), naming the layer. ``allow_weaker: true`` is the one explicit opt-out: the run
then proceeds and warns, naming what is missing.

A layer is made missing on any host by hiding bubblewrap (``find_bwrap`` finds none, as on a
host without it; ``THYME_TEST_NO_BWRAP`` does the same for the whole suite): ``mount_view`` is
then inactive, whatever else the host allows.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from thyme.sandbox.config import LAYERS
from thyme.sandbox.errors import ConfinementError, SandboxWeakerWarning

REPO = Path(__file__).resolve().parents[2]
SHIPPED_RL = REPO / "configs" / "rl_grpo_ats.yaml"
SHIPPED_VERL = REPO / "configs" / "verl_grpo_ats.yaml"


class Reached(Exception):
    """Raised by the fake model / processor loaders: the run got as far as loading the model."""


@pytest.fixture()
def no_mount_view(monkeypatch):
    """bubblewrap is not found: the mount_view layer is missing on this host, whatever it has."""
    from thyme.sandbox import mountview

    real = mountview.find_bwrap
    monkeypatch.setattr(mountview, "find_bwrap", lambda program: None if "/" not in program else real(program))


@pytest.fixture()
def loaders(monkeypatch):
    """Every way ``thyme train rl`` loads a model or processor, recorded (and stopped there)."""
    import transformers

    from thyme.backends import processors

    calls: list[str] = []

    def fake(what):
        def load(*args, **kwargs):
            calls.append(what)
            raise Reached(what)

        return load

    monkeypatch.setattr(processors, "load_processor", fake("processor"))
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", fake("model"))
    return calls


@pytest.fixture()
def train_file(tmp_path) -> Path:
    from PIL import Image

    from thyme.train.rl.data import rl_record

    Image.new("RGB", (64, 48), "red").save(tmp_path / "img.png")
    f = tmp_path / "rl.jsonl"
    f.write_text(json.dumps(rl_record("What colour is it?", "img.png", "red", rid="r1")) + "\n")
    return f


def _train(args: list[str], train_file: Path, tmp_path: Path) -> int:
    from thyme.cli import main

    return main(["train", "rl", "--model", str(tmp_path / "never-loaded"), "--train-file", str(train_file),
                 "--output-dir", str(tmp_path / "out"), *args])


@pytest.mark.parametrize("how", ["shipped config", "sandbox section requiring the layer", "no config (the default)"])
def test_train_rl_stops_before_the_model_loads_naming_the_missing_layer(how, no_mount_view, loaders, train_file, tmp_path, capsys):
    if how == "shipped config":
        args = ["--config", str(SHIPPED_RL)]
    elif how == "sandbox section requiring the layer":
        cfg = tmp_path / "rl.yaml"
        cfg.write_text("rl:\n  num_generations: 2\nsandbox:\n  require: [mount_view]\n  timeout_s: 5\n")
        args = ["--config", str(cfg)]
    else:
        args = []
    rc = _train(args, train_file, tmp_path)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "mount_view" in err and "not active" in err and "allow_weaker" in err, err
    assert "Traceback" not in err
    assert loaders == []  # neither the processor nor the model was loaded
    assert not (tmp_path / "out").exists()


def test_allow_weaker_is_the_explicit_opt_out_and_warns(no_mount_view, loaders, train_file, tmp_path, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="thyme.train.rl")
    with pytest.warns(SandboxWeakerWarning, match="mount_view"), pytest.raises(Reached):
        _train(["--config", str(SHIPPED_RL), "--set", "sandbox.allow_weaker=true"], train_file, tmp_path)
    assert loaders == ["processor"]  # past the sandbox: on to loading the model
    assert any("mount_view" in r.getMessage() and "allow_weaker" in r.getMessage() for r in caplog.records)


def test_a_weaker_sandbox_in_the_library_api_is_refused_too(no_mount_view, loaders, train_file, tmp_path):
    """``build_trainer`` (what embedders call) starts the sandbox from the config before loading."""
    from thyme.train.rl.config import load_rl_config
    from thyme.train.rl.run import build_trainer

    cfg = load_rl_config(SHIPPED_RL, {"model": str(tmp_path / "m"), "train_files": [str(train_file)], "output_dir": str(tmp_path / "out")})
    with pytest.raises(ConfinementError) as e:
        build_trainer(cfg)
    assert "mount_view" in [m for m, _ in e.value.missing]
    assert loaders == []


def test_shipped_configs_and_defaults_require_every_confinement_layer():
    import yaml

    from thyme.integrations.verl.settings import load_agent_settings
    from thyme.train.rl.config import RL_REQUIRED_LAYERS, load_rl_config

    assert set(RL_REQUIRED_LAYERS) == set(LAYERS)
    for cfg in (load_rl_config(SHIPPED_RL), load_rl_config(None)):
        assert set(cfg.sandbox.require) == set(LAYERS) and cfg.sandbox.allow_weaker is False
    section = yaml.safe_load(SHIPPED_VERL.read_text())["thyme"]
    for s in (load_agent_settings(section), load_agent_settings(None)):
        assert set(s.sandbox.require) == set(LAYERS) and s.sandbox.allow_weaker is False
    # a section that sets one key keeps the required layers; the opt-out is explicit
    assert set(load_rl_config(None, {"sandbox.timeout_s": 3}).sandbox.require) == set(LAYERS)
    assert load_agent_settings({"sandbox": {"allow_weaker": True}}).sandbox.allow_weaker is True


# --------------------------------------------------------------------------- the veRL agent loop


@pytest.fixture()
def stub_verl(monkeypatch):
    """The few veRL names ``thyme.integrations.verl.agent_loop`` imports, so its init runs here
    (the real veRL lives in its own environment: tests/integrations/test_verl_agent_loop.py)."""

    class AgentLoopBase:
        def __init__(self, trainer_config, server_manager=None, tokenizer=None, processor=None, **kw):
            self.config = trainer_config
            self.rollout_config = types.SimpleNamespace(prompt_length=4096, response_length=8192)
            self.mm_processor_kwargs = {}
            self.server_manager, self.tokenizer, self.processor = server_manager, tokenizer, processor

    mod = types.ModuleType("verl.experimental.agent_loop.agent_loop")
    mod.AgentLoopBase, mod.AgentLoopMetrics, mod.AgentLoopOutput = AgentLoopBase, dict, dict
    mod.register = lambda name: (lambda cls: cls)
    for name in ("verl", "verl.experimental", "verl.experimental.agent_loop"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.delitem(sys.modules, "thyme.integrations.verl.agent_loop", raising=False)
    import thyme.integrations.verl.agent_loop as loop

    loop._Shared.close()
    yield loop
    loop._Shared.close()
    sys.modules.pop("thyme.integrations.verl.agent_loop", None)


def test_verl_agent_loop_refuses_a_host_missing_a_required_layer_at_init(stub_verl, no_mount_view):
    loop = stub_verl
    with pytest.raises(ConfinementError) as e:
        loop.ThymeAgentLoop({"thyme": yaml_thyme_section()})
    assert "mount_view" in str(e.value) and "allow_weaker" in str(e.value)
    assert loop._Shared.sandbox is None  # nothing half-started is kept for the rollouts


def test_verl_agent_loop_with_allow_weaker_starts_its_sandbox_from_the_section_and_warns(stub_verl, no_mount_view):
    loop = stub_verl
    section = dict(yaml_thyme_section(), sandbox={"allow_weaker": True, "timeout_s": 7})
    with pytest.warns(SandboxWeakerWarning, match="mount_view"):
        agent = loop.ThymeAgentLoop({"thyme": section})
    sb = loop._Shared.sandbox
    assert sb is not None and sb.config.timeout_s == 7 and set(sb.config.require) == set(LAYERS)
    assert ("mount_view" in [m for m, _ in sb.missing_layers]) and agent.cfg.sandbox.allow_weaker


def yaml_thyme_section() -> dict:
    import yaml

    return yaml.safe_load(SHIPPED_VERL.read_text())["thyme"]
