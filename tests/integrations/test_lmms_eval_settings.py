"""``thyme_agent``'s parts that need no lmms-eval (they run in the main suite): the reference's
prompt suffixes, the suffix rule, model_args, the plan (thyme config -> backend, agent,
sandbox), and the session that runs docs through the agent (scripted backend, real sandbox)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from thyme.errors import ThymeError
from thyme.evaluate.data import Row
from thyme.evaluate.prompts import MCQ_INSTRUCTION, build_question, with_suffix
from thyme.integrations.lmms_eval.settings import LmmsEvalSettings, SuffixRule, has_options, parse_model_args, plan

Q = "Question: Is the red balloon above or below the white balloon?\nOptions:\nA. below\nB. above"


# ----------------------------------------------------------------- suffixes (the reference's texts)


def test_the_mcq_suffix_gives_thyme_evals_question():
    row = Row(
        question_id=1, question="Is the red balloon above or below the white balloon?", options={"A": "below", "B": "above"}, answer="A"
    )
    assert with_suffix(Q, "mcq") == build_question(row) == Q + "\n" + MCQ_INSTRUCTION
    assert with_suffix(Q + "\n", "mcq") == build_question(row)  # trailing newline of a doc_to_text
    assert with_suffix(build_question(row), "mcq") == build_question(row)  # never twice
    hinted = Row(question_id=2, question="q", options={"A": "x", "B": "y"}, answer="A", hint="h")
    assert with_suffix("Hint: h\nQuestion: q\nOptions:\nA. x\nB. y", "mcq") == build_question(hinted)
    assert with_suffix("Question: 哪个?\nOptions:\nA. 红\nB. 蓝", "mcq").endswith("\nB. 蓝\n请直接回答选项字母。")


def test_yes_no_and_short_answer_suffixes_are_the_references():
    assert with_suffix("Is there a cat?", "yorn") == "Is there a cat? Please answer yes or no."
    assert (
        with_suffix("What is written?", "vqa")
        == "What is written?\nPlease try to answer the question with short words or phrases if possible."
    )
    assert with_suffix("What is written?", "none") == "What is written?"
    with pytest.raises(ValueError, match="unknown prompt style"):
        with_suffix("q", "cot")


def test_the_suffix_rule_order():
    auto = SuffixRule.parse("auto")
    assert auto.style("thyme_vstar_local", {}, Q) == "mcq"  # options in the text
    assert auto.style("anything", {"options": ["x", "y"]}, "Which one?") == "mcq"  # options in the doc
    assert auto.style("ocrbench", {}, "What is written?") == "vqa"
    assert auto.style("hallusion_bench_image", {}, "Is the line longer?") == "yorn"  # the table
    assert auto.style("mme", {}, "Is this a cat? Please answer yes or no.") == "none"
    assert auto.style("mmvet", {}, "What is it?") == "none"
    rule = SuffixRule.parse("pope*:yorn;mmstar:none;vqa")
    assert rule.style("pope_adv", {}, "Is there a dog?") == "yorn"
    assert rule.style("mmstar", {}, Q) == "none"
    assert rule.style("chartqa", {}, Q) == "vqa"  # the bare style is every other task's
    assert SuffixRule.parse("yorn").style("ocrbench", {}, Q) == "yorn"
    with pytest.raises(ThymeError, match="unknown suffix style 'cot'"):
        SuffixRule.parse("mmstar:cot")


def test_options_are_read_from_the_text_or_the_doc():
    assert has_options("Which?\n(A) red\n(B) blue", {})
    assert has_options("Which?\nChoices: red, blue", {})
    assert not has_options("A. Lincoln was a president. Who followed him?", {})  # one 'A.' line is not a list
    assert has_options("Which?", {"A": "red", "B": "blue"})
    assert not has_options("Which?", {"options": ["only one"]})


# ----------------------------------------------------------------- model_args and the plan


def test_model_args_are_checked():
    s = parse_model_args({"model": 7, "concurrency": "3", "batch_size": 1, "device": "cuda", "content": "full"})
    assert (s.model, s.concurrency, s.content) == ("7", 3, "full")
    with pytest.raises(ThymeError, match=r"unknown model_args \['pretrained'\]"):
        parse_model_args({"model": "m", "pretrained": "x"})
    with pytest.raises(ThymeError, match="content must be"):
        parse_model_args({"model": "m", "content": "all"})
    with pytest.raises(ThymeError, match="max_pixels must be an integer"):
        parse_model_args({"model": "m", "max_pixels": "big"})


def test_the_plan_follows_the_config_then_model_args(tmp_path, monkeypatch):
    cfg = tmp_path / "thyme.yaml"
    cfg.write_text(
        "eval: {concurrency: 3, schedule: independent, benchmark: vstar}\n"
        "agent: {max_rounds: 2, shown_path: /mnt/data/x.png}\n"
        "sandbox: {timeout_s: 7}\n"
        "model: {max_pixels: 50176, dtype: float32}\n"
        "judge: {model: gpt}\n"
    )
    notes: list[str] = []
    p = plan(LmmsEvalSettings(model="/ckpt", config=str(cfg), min_pixels=3136), log=notes.append)
    assert (p.kind, p.local) == ("hf", True)
    assert p.backend_options == {"model": "/ckpt"}
    assert p.backend_config == {"max_pixels": 50176, "dtype": "float32", "min_pixels": 3136}
    assert (p.agent.max_rounds, p.agent.shown_path, p.sandbox.timeout_s) == (2, "/mnt/data/x.png", 7)
    assert (p.concurrency, p.schedule) == (3, "independent")
    assert any("section 'judge'" in n for n in notes)
    assert any("eval settings ['benchmark'] are not used" in n for n in notes)

    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    p = plan(LmmsEvalSettings(model="served", base_url="http://127.0.0.1:9/v1", concurrency=5))
    assert p.kind == "openai" and p.backend_options["api_key"] == "sk-secret"
    assert p.backend_options["concurrency"] == 5 and p.concurrency == 5
    assert p.backend_config == {} and "sk-secret" not in json.dumps(p.describe())
    from thyme.rollout.registry import build_backend

    with build_backend(p.kind, p.backend_config, **p.backend_options) as backend:  # nothing is sent yet
        # no budget given: the reference's (Qwen2.5-VL's processor), not lmms-eval's 200704 .. 1605632
        assert (backend.config.min_pixels, backend.config.max_pixels) == (3136, 12845056)


def test_bad_plans_are_refused(tmp_path):
    with pytest.raises(ThymeError, match="say which model answers"):
        plan(LmmsEvalSettings())
    with pytest.raises(ThymeError, match="base_url needs model"):
        plan(LmmsEvalSettings(base_url="http://127.0.0.1:9/v1"))
    with pytest.raises(ThymeError, match="unknown backend 'nope'"):
        plan(LmmsEvalSettings(model="m", backend="nope"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle: {max_pixels: 1}\n")
    with pytest.raises(ThymeError, match="modle"):
        plan(LmmsEvalSettings(model="m", config=str(bad)))
    bad.write_text("model: {max_pixel: 1}\n")
    with pytest.raises(ThymeError, match="max_pixel"):
        plan(LmmsEvalSettings(model="m", config=str(bad)))


def test_importing_the_plugin_imports_no_lmms_eval_and_no_model():
    code = (
        "import sys, thyme.integrations.lmms_eval as p, thyme.integrations.lmms_eval.session; "
        "assert p.MODEL_NAME == 'thyme_agent'; "
        "bad = [m for m in ('lmms_eval', 'torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------- the session (scripted backend, real sandbox)

ANSWER_B = "<think>The red one is lower.</think>\n<answer>B</answer>"
CROP = (
    "<think>Zoom.\n<code>\n```python\nfrom PIL import Image\nimg = Image.open(image_path)\n"
    "img.crop((0, 0, 16, 16)).save('/mnt/data/temp_processed_images/c.png')\nprint('/mnt/data/temp_processed_images/c.png')\n```\n</code>"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from thyme.backends.processors import load_processor

    return load_processor(str(tiny_checkpoint), max_pixels=12544).tokenizer


def _messages(text, image):
    return [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": [{"type": "image", "url": image}, {"type": "text", "text": text}]},
    ]


def test_the_session_answers_docs_and_survives_bad_ones(tokenizer, tmp_path):
    from thyme.integrations.lmms_eval.session import AgentSession
    from thyme.testing.scripted import ScriptedBackend

    # keyed by the whole suffixed question: a doc asked without its suffix finds no script and fails
    scripts = {
        with_suffix(Q, "mcq"): [CROP, ANSWER_B],
        "Is the sky blue? Please answer yes or no.": ["<answer>yes</answer>"],
    }
    errors: list[str] = []
    image = Image.new("RGB", (64, 48), "white")
    # concurrency 1: lockstep batches of one (a backend call that raises fails its whole batch, as in thyme eval)
    settings = LmmsEvalSettings(model="scripted", output_dir=str(tmp_path / "out"), suffix="pope*:yorn", concurrency=1)
    with AgentSession(settings, backend=ScriptedBackend(tokenizer, scripts), log=lambda s: None, error_log=errors.append) as session:
        items = [
            session.item("t/test/0", "vstar_local", {}, lambda: _messages(Q, image)),
            session.item("p/test/0", "pope_adv", {}, lambda: _messages("Is the sky blue?", image)),
            session.item("t/test/1", "vstar_local", {}, lambda: 1 / 0),  # the task's own function raises
            session.item("t/test/2", "vstar_local", {}, lambda: [{"role": "user", "content": [{"type": "video", "url": "v.mp4"}]}]),
            session.item("t/test/3", "ocrbench", {}, lambda: _messages("What is written?", image)),  # no script: the trajectory fails
        ]
        assert session.answer(items) == ["B", "yes", "", "", ""]
        session.settings.content = "full"
        full = session.answer([session.item("t/test/0", "vstar_local", {}, lambda: _messages(Q, image))])
    assert full[0].startswith(CROP) and "<sandbox_output>" in full[0] and full[0].endswith(ANSWER_B)
    assert [e.split(" failed")[0] for e in errors] == [
        "thyme_agent: doc t/test/1",
        "thyme_agent: doc t/test/2",
        "thyme_agent: doc t/test/3",
    ]
    assert "ZeroDivisionError" in errors[0] and "unsupported content part 'video'" in errors[1]
    lines = [json.loads(l) for l in (tmp_path / "out" / "trajectories.jsonl").read_text().splitlines()]
    assert [(d["key"], d["suffix"], d["answer"]) for d in lines[:2]] == [("t/test/0", "mcq", "B"), ("p/test/0", "yorn", "yes")]
    assert lines[0]["trajectory"]["turns"][0]["execution"]["images"], "the crop ran in the sandbox"
    assert lines[0]["trajectory"]["question"] == build_question(
        Row(
            question_id=0, question="Is the red balloon above or below the white balloon?", options={"A": "below", "B": "above"}, answer="A"
        )
    )
