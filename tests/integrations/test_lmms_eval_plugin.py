"""``--model thyme_agent`` inside lmms-eval (its own environment: ``make test-lmms-eval``): the
entry point registers it beside lmms-eval's own ``thyme``; ``generate_until`` answers each doc
through the agent (a scripted backend registered as a backend kind), a failing doc answers ``""``
with its error logged; the request types it cannot serve say what to use instead.

Skipped where lmms-eval is not importable; failed instead with ``THYME_REQUIRE_LMMS_EVAL=1``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from .lmms_eval_helpers import require_lmms_eval

Q = "Question: Which balloon is higher?\nOptions:\nA. red\nB. white"


@pytest.fixture(scope="module", autouse=True)
def _lmms_eval():
    require_lmms_eval()


def test_the_entry_point_registers_thyme_agent_beside_lmms_evals_thyme():
    from lmms_eval import models

    from thyme.integrations.lmms_eval import CLASS_PATH
    from thyme.integrations.lmms_eval.model import ThymeAgent

    assert models.get_model("thyme_agent") is ThymeAgent
    assert ThymeAgent.is_simple is False  # a chat model: requests carry doc_to_messages
    assert "thyme_agent" in models.list_available_models()
    assert models.get_model_manifest("thyme").chat_class_path not in (None, CLASS_PATH)  # the built-in one is untouched


@pytest.fixture
def scripted_kind(tiny_checkpoint):
    from thyme.backends.processors import load_processor
    from thyme.rollout.registry import BACKENDS, register_backend
    from thyme.testing.scripted import ScriptedBackend

    tok = load_processor(str(tiny_checkpoint), max_pixels=12544).tokenizer
    scripts = {
        Q + "\nPlease select the correct answer from the options above.": ["<think>Red is higher.</think>\n<answer>A</answer>"],
        "Is the sky blue? Please answer yes or no.": ["<answer>yes</answer>"],
    }
    register_backend("lmms_test_scripted", lambda config=None, **options: ScriptedBackend(tok, scripts), replace=True)
    try:
        yield "lmms_test_scripted"
    finally:
        BACKENDS.unregister("lmms_test_scripted")


def _request(task, doc_id, messages):
    return SimpleNamespace(args=("ctx", messages, {"max_new_tokens": 16, "until": ["\n\n"]}, doc_id, task, "test"))


def test_generate_until_answers_each_doc_and_a_failing_doc_answers_empty(scripted_kind, tmp_path):
    from loguru import logger

    from thyme.integrations.lmms_eval.model import ThymeAgent

    image = Image.new("RGB", (64, 48), "white")

    def messages(text):
        return lambda doc: [{"role": "user", "content": [{"type": "image", "url": image}, {"type": "text", "text": text}]}]

    def broken(doc):
        raise FileNotFoundError("image missing")

    logged: list[str] = []
    sink = logger.add(lambda m: logged.append(str(m)), level="INFO")
    model = ThymeAgent(backend=scripted_kind, model="scripted", batch_size=1, device="cpu", concurrency=1, output_dir=str(tmp_path))
    try:
        model.task_dict = {"vstar_local": {"test": [{"q": 0}, {"q": 1}]}, "hallusion_bench_image": {"test": [{"q": 2}]}}
        answers = model.generate_until(
            [
                _request("vstar_local", 0, messages(Q)),
                _request("hallusion_bench_image", 0, messages("Is the sky blue?")),
                _request("vstar_local", 1, broken),
                _request("vstar_local", 7, messages(Q)),  # no such doc
            ]
        )
    finally:
        model.close()
        logger.remove(sink)
    assert answers == ["A", "yes", "", ""]
    text = "".join(logged)
    assert "doc vstar_local/test/1 failed" in text and "FileNotFoundError: image missing" in text
    assert "doc vstar_local/test/7 failed" in text
    assert "pixel budget" in text and "generation_kwargs" in text
    assert len((tmp_path / "trajectories.jsonl").read_text().splitlines()) == 2  # the docs that ran, kept in output_dir


def test_other_request_types_say_what_to_use(scripted_kind):
    from thyme.integrations.lmms_eval.model import ThymeAgent

    model = ThymeAgent(backend=scripted_kind, model="scripted")
    try:
        with pytest.raises(NotImplementedError, match="generate_until"):
            model.loglikelihood([])
        with pytest.raises(NotImplementedError, match="generate_until task"):
            model.generate_until_multi_round([])
    finally:
        model.close()


def test_bad_model_args_stop_before_anything_loads():
    from thyme.errors import ThymeError
    from thyme.integrations.lmms_eval.model import ThymeAgent

    with pytest.raises(ThymeError, match="unknown model_args"):
        ThymeAgent(pretrained="Qwen/Qwen2.5-VL-7B-Instruct")
    with pytest.raises(ThymeError, match="say which model answers"):
        ThymeAgent()
