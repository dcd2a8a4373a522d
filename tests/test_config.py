"""One source of truth for configuration (issue 8): flags, YAML keys and --help texts come from
the config dataclasses' field metadata; paper constants are defined once; sections, keys and API
keys behave the same in every command; one retry policy for every HTTP client."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import sys
import types
from pathlib import Path

import pytest

from thyme import constants
from thyme.cli import build_parser, main
from thyme.config import build, help_text
from thyme.errors import ThymeError

SRC = Path(__file__).resolve().parents[1] / "src" / "thyme"
EVAL = ["eval", "--benchmark", "hrbench4k", "--data", "nowhere.tsv", "--out", "o"]


def _yaml(tmp_path, text: str) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return str(p)


def _image(tmp_path) -> str:
    from PIL import Image

    p = tmp_path / "img.png"
    Image.new("RGB", (32, 24), "white").save(p)
    return str(p)


class _Captured(Exception):
    pass


def _fake_openai(monkeypatch) -> dict:
    """Replace the OpenAI backend by one that records its keyword arguments and stops the run."""
    from thyme.backends.openai import OpenAIConfig

    made: dict = {}

    class FakeOpenAIBackend:
        name = "openai"

        def __init__(self, base_url, model, **kw):
            made.update(base_url=base_url, model=model, **kw)
            raise _Captured()

    monkeypatch.setitem(sys.modules, "thyme.backends.openai", types.SimpleNamespace(OpenAIBackend=FakeOpenAIBackend, OpenAIConfig=OpenAIConfig))
    return made


def _build_openai(argv, monkeypatch, tmp_path):
    """Parse an eval command line and call the backend factory it builds (fake backend)."""
    from thyme.cli import eval as cli_eval

    made = _fake_openai(monkeypatch)
    args = build_parser().parse_args(argv)
    seen = {}

    def fake_run_eval(cfg, *, backend_factory, **kw):
        seen["settings"] = kw.get("settings")
        with pytest.raises(_Captured):
            backend_factory()
        raise _Captured()

    monkeypatch.setattr("thyme.evaluate.runner.run_eval", fake_run_eval)
    with pytest.raises(_Captured):
        cli_eval.run(args)
    return made, seen["settings"]


# --------------------------------------------------------------------------- eval --base-url


def test_eval_base_url_passes_the_whole_model_section_to_the_openai_backend(tmp_path, monkeypatch):
    """Defect: openai_backend_factory kept only min/max_pixels of the model section."""
    cfg = _yaml(tmp_path, "model:\n  continuation: sglang\n  send_stop: false\n  timeout_s: 30\n  image_format: png\n  extra_body: {top_k: 1}\n  max_pixels: 50176\n")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    made, settings = _build_openai([*EVAL, "--base-url", "http://127.0.0.1:9/v1", "--model", "served", "--config", cfg, "--concurrency", "3"], monkeypatch, tmp_path)
    assert made["continuation"] == "sglang" and made["send_stop"] is False and made["timeout_s"] == 30
    assert made["image_format"] == "png" and made["extra_body"] == {"top_k": 1} and made["max_pixels"] == 50176
    assert made["concurrency"] == 3 and made["model"] == "served" and "api_key" not in made
    assert "api_key" not in settings["model_flags"]


def test_eval_base_url_flags_override_the_model_section(tmp_path, monkeypatch):
    cfg = _yaml(tmp_path, "model:\n  continuation: sglang\n  send_stop: true\n")
    made, _ = _build_openai([*EVAL, "--base-url", "http://h/v1", "--model", "m", "--config", cfg, "--continuation", "none", "--no-send-stop", "--extra-body", '{"a": 1}'], monkeypatch, tmp_path)
    assert made["continuation"] == "none" and made["send_stop"] is False and made["extra_body"] == {"a": 1}


# --------------------------------------------------------------------------- API keys from the environment


def test_openai_api_key_from_the_environment_and_flags_win(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    made, _ = _build_openai([*EVAL, "--base-url", "http://h/v1", "--model", "m"], monkeypatch, tmp_path)
    assert made["api_key"] == "sk-env"
    cfg = _yaml(tmp_path, "model:\n  api_key: sk-yaml\n")
    made, _ = _build_openai([*EVAL, "--base-url", "http://h/v1", "--model", "m", "--config", cfg], monkeypatch, tmp_path)
    assert made["api_key"] == "sk-yaml"
    made, _ = _build_openai([*EVAL, "--base-url", "http://h/v1", "--model", "m", "--config", cfg, "--api-key", "sk-flag"], monkeypatch, tmp_path)
    assert made["api_key"] == "sk-flag"


def test_judge_api_key_from_the_environment(monkeypatch):
    from thyme.cli import eval as cli_eval

    monkeypatch.setenv("THYME_JUDGE_API_KEY", "sk-judge")
    args = build_parser().parse_args([*EVAL, "--replay", "r.jsonl", "--judge-base-url", "http://127.0.0.1:9/v1", "--judge-model", "j"])
    judge = cli_eval._judge(args, {})
    assert judge.config.api_key == "sk-judge" and judge.config.model == "j"
    args = build_parser().parse_args([*EVAL, "--replay", "r.jsonl", "--judge-base-url", "http://127.0.0.1:9/v1", "--judge-model", "j", "--judge-api-key", "sk-flag"])
    assert cli_eval._judge(args, {}).config.api_key == "sk-flag"


def test_env_keys_are_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "OPENAI_API_KEY" in out and "THYME_JUDGE_API_KEY" in out


# --------------------------------------------------------------------------- bad keys


@pytest.mark.parametrize(
    "yaml_text, extra, key",
    [
        ("agent:\n  max_roundz: 3\n", ["--model", "m"], "max_roundz"),
        ("sandbox:\n  timeout: 3\n", ["--model", "m"], "timeout"),
        ("model:\n  continuation: vllm\n", ["--model", "m"], "continuation"),  # hf path: was a bare TypeError
        ("model:\n  dtype: bfloat16\n", ["--base-url", "http://h/v1", "--model", "m"], "dtype"),  # openai path
        ("eval:\n  benchmarkz: vstar\n", ["--model", "m"], "benchmarkz"),
        ("judge:\n  urll: http://x\n", ["--model", "m"], "urll"),
    ],
)
def test_a_bad_key_in_any_section_of_eval_is_a_clear_error(tmp_path, capsys, monkeypatch, yaml_text, extra, key):
    monkeypatch.setattr("thyme.evaluate.runner.run_eval", lambda *a, **k: pytest.fail("the run started"))
    assert main([*EVAL, *extra, "--config", _yaml(tmp_path, yaml_text)]) == 2
    err = capsys.readouterr().err
    assert f"'{key}'" in err and "known settings" in err, err


@pytest.mark.parametrize("yaml_text, key", [("model:\n  dtypo: bfloat16\n", "dtypo"), ("agent:\n  max_roundz: 3\n", "max_roundz"), ("sandbox:\n  min_crop: 3\n", "min_crop")])
def test_a_bad_key_for_run_is_a_clear_error_before_loading(tmp_path, capsys, monkeypatch, yaml_text, key):
    monkeypatch.setattr("thyme.backends.hf.HFBackend.__init__", lambda *a, **k: pytest.fail("the model was loaded"))
    rc = main(["run", "--image", _image(tmp_path), "--question", "q", "--model", "m", "--config", _yaml(tmp_path, yaml_text)])
    err = capsys.readouterr().err
    assert rc == 2 and f"'{key}'" in err and "known settings" in err, err


def test_transformers_only_flags_with_base_url_are_an_error_not_dropped(capsys, monkeypatch):
    monkeypatch.setattr("thyme.evaluate.runner.run_eval", lambda *a, **k: pytest.fail("the run started"))
    assert main([*EVAL, "--base-url", "http://h/v1", "--model", "m", "--dtype", "bfloat16"]) == 2
    assert "--dtype" in capsys.readouterr().err


# --------------------------------------------------------------------------- one YAML file for run, replay, eval


def test_replay_accepts_the_shared_file_with_a_note(tmp_path, capsys):
    cfg = _yaml(tmp_path, "agent:\n  max_rounds: 3\nsandbox:\n  timeout_s: 5\nmodel:\n  max_pixels: 50176\neval:\n  concurrency: 2\njudge:\n  model: j\n")
    assert main(["replay", str(tmp_path / "missing.jsonl"), "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "section 'model' is not used by this command; ignored" in err
    assert "section 'eval' is not used" in err and "section 'judge' is not used" in err
    assert "records file not found" in err and "unknown section" not in err


def test_eval_score_ignores_runtime_sections_and_refuses_unknown_ones(tmp_path, capsys):
    cfg = _yaml(tmp_path, "agent:\n  max_rounds: 3\nmodels:\n  x: 1\n")
    assert main(["eval", "score", "--benchmark", "vstar", "--data", "d", "--predictions", "p", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "unknown section(s) ['models']" in err


# --------------------------------------------------------------------------- generated flags and help


def test_help_texts_are_generated_with_default_and_source(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--max-new-tokens MAX_NEW_TOKENS tokens per generation round (default 2048; reference eval)" in out
    assert "--timeout TIMEOUT" in out and "(default 10.0; reference: 10 s)" in out
    assert "--on-error {show,regenerate}" in out and "(default 64; reference: 64)" in out
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--report, --no-report" in out and "--retry-failed, --no-retry-failed" in out
    assert "--continuation {vllm,sglang,completions,none}" in out and "--judge-response-format {json_schema,json_object,none}" in out


def test_cli_sources_write_no_config_default_twice():
    """The '(default N)' texts of config fields are generated, not written in the cli."""
    for path in (SRC / "cli").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        for literal in ("default 2048", "(2048)", "default 10)", "(10)", "(64", "default 3211264", "default 8)", "default json_schema"):
            assert literal not in text, (path.name, literal)


def test_flag_names_users_type_are_unchanged():
    p = build_parser()
    args = p.parse_args(["run", "--image", "i", "--question", "q", "--model", "m", "--timeout", "3", "--min-crop-side", "0", "--max-new-tokens", "9",
                         "--max-rounds", "2", "--temperature", "0.5", "--on-error", "regenerate", "--shown-path", "{name}", "--prefill", "<think>", "--dtype", "float32"])
    from thyme.cli.entry import agent_config, hf_config, sandbox_config

    a, s, m = agent_config(args, {}), sandbox_config(args, {}), hf_config(args, {})
    assert (a.max_new_tokens, a.max_rounds, a.temperature, a.on_error, a.shown_path, a.prefill) == (9, 2, 0.5, "regenerate", "{name}", "<think>")
    assert (s.timeout_s, s.min_crop_side, m.dtype) == (3.0, 0, "float32")
    args = p.parse_args(["eval", "--benchmark", "vstar", "--data", "d", "--out", "o", "--model", "m", "--limit", "4", "--concurrency", "2", "--num-shards", "2",
                         "--shard", "1", "--no-report", "--no-retry-failed", "--judge-base-url", "http://j/v1", "--judge-model", "jm", "--judge-response-format", "none"])
    from thyme.cli.eval import _eval_config

    e = _eval_config(args, {})
    assert (e.limit, e.concurrency, e.num_shards, e.shard, e.report, e.retry_failed) == (4, 2, 2, 1, False, False)
    assert (args.judge_base_url, args.judge_model, args.judge_response_format) == ("http://j/v1", "jm", "none")


def test_defaults_yaml_flags_precedence_and_field_metadata():
    from thyme.agent import AgentConfig

    class NS:
        max_rounds = 4
        temperature = None

    cfg = build(AgentConfig, {"max_rounds": 2, "temperature": 0.7}, NS(), names=("max_rounds", "temperature"), section_name="agent")
    assert (cfg.max_rounds, cfg.temperature, cfg.max_new_tokens) == (4, 0.7, 2048)
    with pytest.raises(ThymeError, match=r"config section 'agent': unknown setting\(s\) \['x'\]"):
        build(AgentConfig, {"x": 1}, section_name="agent")
    from thyme.backends.hf import HFConfig
    from thyme.backends.openai import OpenAIConfig
    from thyme.data.convert import ConvertConfig
    from thyme.data.masks import MaskConfig
    from thyme.data.verify import VerifyConfig
    from thyme.evaluate.runner import EvalConfig
    from thyme.sandbox import SandboxConfig
    from thyme.scoring.judge import JudgeConfig
    from thyme.train.rewards import RewardConfig
    from thyme.train.sft_config import ThymeSFTSettings  # SFTRunConfig = TRL's SFTConfig (TRL's help) + these

    for cls in (AgentConfig, SandboxConfig, EvalConfig, OpenAIConfig, HFConfig, JudgeConfig, RewardConfig, ConvertConfig, VerifyConfig, MaskConfig, ThymeSFTSettings):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help") and f.metadata.get("source"), (cls.__name__, f.name)
            assert "(default" in help_text(f)
        assert "Attributes:" not in (cls.__doc__ or ""), cls.__name__


def test_hf_backend_still_takes_keyword_arguments():
    import inspect

    from thyme.backends.hf import HFBackend, HFConfig

    params = inspect.signature(HFBackend).parameters
    assert {f.name for f in dataclasses.fields(HFConfig)} <= set(params)


# --------------------------------------------------------------------------- constants defined once


def _literals(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and not isinstance(node.value, bool):
            yield node
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    yield t


def test_paper_constants_are_defined_once():
    owners = []
    for path in SRC.rglob("*.py"):
        if path.name == "constants.py" and path.parent == SRC:
            continue
        for node in _literals(path):
            if isinstance(node, ast.Name):
                if node.id in ("MAX_FIXES", "MAX_OUTPUT_CHARS", "OUTPUT_DIR_MARKER", "MAX_PIXELS"):
                    owners.append((path.name, node.id))
            elif node.value in (constants.MAX_PIXELS, constants.OUTPUT_DIR_ALIAS, constants.OUTPUT_DIR_MARKER, constants.OUTPUT_DIR_ALIAS + "/"):
                owners.append((path.name, node.value))
    assert owners == []
    assert constants.MAX_PIXELS == 3211264 and constants.MAX_OUTPUT_CHARS == 4096 and constants.OUTPUT_DIR_ALIAS == "/mnt/data/temp_processed_images"
    tree = ast.parse((SRC / "constants.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_config_defaults_use_the_constants():
    from thyme import protocol
    from thyme.agent import AgentConfig
    from thyme.data.masks import MaskConfig
    from thyme.sandbox import SandboxConfig
    from thyme.train.sft_config import SFTRunConfig

    assert AgentConfig().max_output_chars == protocol.FeedbackConfig().max_output_chars == constants.MAX_OUTPUT_CHARS
    assert MaskConfig().max_pixels == SFTRunConfig().max_pixels == constants.MAX_PIXELS
    assert SandboxConfig().output_dir_alias == constants.OUTPUT_DIR_ALIAS


# --------------------------------------------------------------------------- one retry policy


def test_one_set_of_retryable_statuses():
    from thyme.http import is_retryable_status

    assert all(is_retryable_status(s) for s in (408, 409, 425, 429, 500, 502, 503, 504, 599))
    assert not any(is_retryable_status(s) for s in (200, 400, 401, 403, 404, 413, 422))
    for path in (SRC / "backends" / "openai.py", SRC / "scoring" / "judge.py"):
        text = path.read_text(encoding="utf-8")
        assert "retrying(" in text and "asyncio.sleep(" not in text and "retry_delay(" not in text, path.name


def _mock_client(statuses):
    import httpx

    seen = []

    def handler(request):
        status, headers = statuses[len(seen)] if len(seen) < len(statuses) else (200, {})
        seen.append(status)
        if status == 200:
            return httpx.Response(200, json={"choices": [{"message": {"content": '{"correct": 1}'}}]})
        return httpx.Response(status, text="busy", headers=headers)

    return httpx.AsyncClient(transport=httpx.MockTransport(handler)), seen


@pytest.mark.parametrize("status", [408, 409, 425, 429, 503])
def test_backend_and_judge_retry_the_same_statuses_and_honour_retry_after(status):
    pytest.importorskip("httpx")
    pytest.importorskip("tenacity")
    from thyme.backends.openai import OpenAIBackend
    from thyme.scoring.judge import JudgeClient, JudgeConfig

    async def go():
        client, seen = _mock_client([(status, {"Retry-After": "0"})])
        b = OpenAIBackend("http://127.0.0.1:9/v1", "m", backoff_s=0.0, max_retries=2)
        data = await b._post(client, "/chat/completions", b"{}")
        assert seen == [status, 200] and b.stats["retries"] == 1 and "choices" in data
        client, seen = _mock_client([(status, {"Retry-After": "0"})])
        j = JudgeClient(JudgeConfig(base_url="http://127.0.0.1:9/v1", model="j", backoff_s=0.0, max_retries=2))
        text, attempts = await j._post(client, {})
        assert seen == [status, 200] and attempts == 2 and "correct" in text

    asyncio.run(go())


def test_retry_after_is_honoured_up_to_the_cap():
    from thyme.http import retry_delay

    assert retry_delay(1, 0.0, 30.0, "7") == 7.0
    assert retry_delay(1, 0.0, 5.0, "70") == 5.0
    assert 1.0 <= retry_delay(1, 1.0, 30.0, None) <= 1.25 and 2.0 <= retry_delay(2, 1.0, 30.0, "junk") <= 2.5
