"""The multi-turn loop: stop reasons, feedback placement, error handling, trajectory JSON.

These use the replay backend and a scripted stand-in sandbox, so each loop rule is tested
in isolation; the real sandbox is exercised end to end in test_replay.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from thyme.agent import Agent, AgentConfig, Task, Trajectory
from thyme.backends.repetition import text_loops
from thyme.backends.base import Backend, BatchGenerationError, Generation
from thyme.backends.replay import ReplayBackend

CODE = "<think>look<code>\n```python\nprint(1)\n```\n</code>"


@dataclass
class FakeResult:
    ok: bool = True
    stdout: str = ""
    error: dict | None = None
    images: list = field(default_factory=list)
    timed_out: bool = False
    state_lost: bool = False
    duration_s: float = 0.001

    def to_dict(self):
        return dict(self.__dict__, fixes=[])


class FakeSession:
    def __init__(self, script, tmp):
        self.script, self.tmp, self.codes = script, tmp, []

    def run(self, code):
        self.codes.append(code)
        r = self.script.pop(0) if self.script else FakeResult(stdout="ok\n")
        if r == "image":
            p = self.tmp / f"out{len(self.codes)}.png"
            Image.new("RGB", (8, 8)).save(p)
            return FakeResult(images=[str(p)])
        return r


class FakeSandbox:
    def __init__(self, tmp, script=None):
        self.tmp, self.script, self.sessions = tmp, list(script or []), []

    @contextlib.contextmanager
    def session(self, images, shown_paths=None):
        s = FakeSession(self.script, self.tmp)
        self.sessions.append((images, shown_paths, s))
        yield s


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "in.jpg"
    Image.new("RGB", (64, 48), "white").save(p)
    return str(p)


def run_one(tmp_path, image, response, script=None, **cfg):
    backend = ReplayBackend({"t": response})
    sandbox = FakeSandbox(tmp_path, script)
    with Agent(backend, sandbox, AgentConfig(**cfg), artifacts_dir=tmp_path / "art") as agent:
        traj = agent.run("Q?", [image], id="t")
    return traj, sandbox


def test_code_then_answer(tmp_path, image):
    traj, sandbox = run_one(tmp_path, image, CODE + "<sandbox_output><image></sandbox_output>seen</think>\n<answer>B</answer>", ["image"])
    assert traj.stop_reason == "answer" and traj.answer == "B"
    assert [t.end for t in traj.turns] == ["code", "answer"]
    assert sandbox.sessions[0][2].codes == ["print(1)"]
    # the output image was copied out of the sandbox and sits in the same assistant message
    parts = traj.assistant_parts()
    assert [p["type"] for p in parts] == ["text", "image", "text"]
    assert parts[0]["text"].endswith("</code>\n<sandbox_output>")
    assert parts[2]["text"].startswith("</sandbox_output>seen")
    assert Path(parts[1]["image"]).is_file() and "art" in parts[1]["image"]
    assert traj.response_text() == CODE + "\n<sandbox_output><image></sandbox_output>seen</think>\n<answer>B</answer>"
    assert traj.tool_used and traj.code_blocks == 1


def test_user_prompt_uses_the_real_path_and_size_by_default(tmp_path, image):
    backend = ReplayBackend({"t": "<answer>A</answer>"})
    seen = []
    orig = backend.generate
    backend.generate = lambda reqs, stream=None: (seen.extend(reqs), orig(reqs, stream))[1]
    with Agent(backend, FakeSandbox(tmp_path), AgentConfig(shown_path="/mnt/data/{name}")) as agent:
        traj = agent.run("Q?", [image], id="t")
    text = seen[0].messages[1]["content"][1]["text"]
    assert '"/mnt/data/in.jpg"' in text and '"64x48"' in text
    assert traj.shown_paths == ["/mnt/data/in.jpg"]


def test_errors_are_shown_by_default(tmp_path, image):
    err = FakeResult(ok=False, error={"type": "NameError", "message": "name 'q' is not defined", "lineno": 1})
    traj, sandbox = run_one(tmp_path, image, CODE + "<sandbox_output>x</sandbox_output><answer>C</answer>", [err])
    assert "NameError" in traj.response_text()
    assert len(sandbox.sessions[0][2].codes) == 1


def test_regenerate_hides_errors_then_shows_the_last(tmp_path, image):
    err = FakeResult(ok=False, error={"type": "ValueError", "message": "bad", "lineno": 2})
    traj, sandbox = run_one(tmp_path, image, CODE + "<answer>C</answer>", [err, err, err], on_error="regenerate", max_regenerations=2)
    assert len(sandbox.sessions[0][2].codes) == 3  # two hidden retries, then shown
    assert len(traj.turns[0].discarded) == 2
    assert "ValueError: bad" in traj.response_text()


def test_round_limit(tmp_path, image):
    traj, _ = run_one(tmp_path, image, CODE * 5, max_rounds=2)
    assert traj.stop_reason == "max_rounds" and len(traj.turns) == 2


def test_image_cap(tmp_path, image):
    traj, _ = run_one(tmp_path, image, CODE * 4 + "<answer>A</answer>", ["image", "image", "image"], max_images=3)
    assert traj.stop_reason == "image_cap"
    assert len(traj.output_images()) == 2


class CountingBackend(Backend):
    """Emits a fixed text with a token count, to test the token caps."""

    def __init__(self, text, finish, tokens):
        self.text, self.finish, self.tokens, self.requests = text, finish, tokens, []

    def generate(self, requests, stream=None):
        self.requests.extend(requests)
        return [Generation(self.text, self.finish, num_tokens=self.tokens) for _ in requests]


def test_total_token_cap_and_per_round_budget(tmp_path, image):
    backend = CountingBackend(CODE, "stop", 60)
    with Agent(backend, FakeSandbox(tmp_path), AgentConfig(max_total_tokens=100, max_new_tokens=80)) as agent:
        traj = agent.run("Q", [image])
    assert traj.stop_reason == "token_cap"
    assert [r.max_new_tokens for r in backend.requests] == [80, 40]


def test_length_and_repetition(tmp_path, image):
    with Agent(CountingBackend("<think>abc", "length", 10), FakeSandbox(tmp_path)) as agent:
        assert agent.run("Q", [image]).stop_reason == "length"
    loop = "<think>" + "I will zoom in on the sign. " * 60
    with Agent(CountingBackend(loop, "length", 10), FakeSandbox(tmp_path)) as agent:
        assert agent.run("Q", [image]).stop_reason == "repetition"
    assert not text_loops("".join(chr(0x4E00 + i) for i in range(2000)), AgentConfig().repetition_rule())


def test_one_bad_task_does_not_take_down_the_batch(tmp_path, image):
    backend = ReplayBackend({"good": "<answer>A</answer>", "bad": "<answer>B</answer>"})
    with Agent(backend, FakeSandbox(tmp_path)) as agent:
        good, bad = agent.run_batch([Task("Q", [image], id="good"), Task("Q", [str(tmp_path / "missing.jpg")], id="bad")])
    assert good.stop_reason == "answer" and good.answer == "A"
    assert bad.stop_reason == "error" and "missing.jpg" in bad.error


def test_prefilled_code_runs_before_the_first_round(tmp_path, image):
    backend = ReplayBackend({"t": "after</think><answer>D</answer>"})
    sandbox = FakeSandbox(tmp_path, ["image"])
    with Agent(backend, sandbox, AgentConfig(prefill=CODE), artifacts_dir=tmp_path / "a") as agent:
        traj = agent.run("Q", [image], id="t")
    assert sandbox.sessions[0][2].codes == ["print(1)"]
    assert traj.response_text() == CODE + "\n<sandbox_output><image></sandbox_output>after</think><answer>D</answer>"
    assert traj.answer == "D"


def test_trajectory_round_trips_through_json_with_relative_images(tmp_path, image):
    traj, _ = run_one(tmp_path, image, CODE + "<answer>B</answer>", ["image"])
    out = traj.save(tmp_path / "runs" / "traj.json")
    raw = out.read_text()
    assert str(tmp_path / "art") not in raw  # images referenced relative to the JSON
    back = Trajectory.load(out)
    assert back.answer == "B" and back.stop_reason == "answer"
    assert back.response_text() == traj.response_text()
    assert all(Path(p).is_file() for p in back.output_images() + back.images)
    assert Path(back.output_images()[0]).parent == tmp_path / "runs" / "traj_images"


class OneBadRequest(Backend):
    def generate(self, requests, stream=None):
        gens = [Generation("<answer>A</answer>", "stop") for _ in requests]
        errors = [None] * len(requests)
        for i, r in enumerate(requests):
            if r.key == "bad":
                errors[i], gens[i] = RuntimeError("HTTP 400: context too long"), None
        if any(errors):
            raise BatchGenerationError(gens, errors)
        return gens


def test_a_failed_request_fails_only_its_trajectory(tmp_path, image):
    with Agent(OneBadRequest(), FakeSandbox(tmp_path)) as agent:
        good, bad = agent.run_batch([Task("Q", [image], id="good"), Task("Q", [image], id="bad")])
    assert (good.stop_reason, good.answer) == ("answer", "A")
    assert bad.stop_reason == "error" and "context too long" in bad.error


class WholeBatchFails(Backend):
    def generate(self, requests, stream=None):
        raise RuntimeError("server down")


def test_a_failed_batch_fails_every_trajectory_with_the_backends_traceback(tmp_path, image):
    with Agent(WholeBatchFails(), FakeSandbox(tmp_path)) as agent:
        trajs = agent.run_batch([Task("Q", [image], id="a"), Task("Q", [image], id="b")])
    assert [t.stop_reason for t in trajs] == ["error", "error"]
    assert all("RuntimeError: server down" in t.error and "in generate" in t.error for t in trajs)


def test_backends_declare_capabilities_instead_of_names():
    from thyme.backends.base import Capabilities
    from thyme.backends.hf import HFBackend
    from thyme.backends.openai import OpenAIBackend, OpenAIBatchError
    from thyme.backends.replay import ReplayBackend

    assert OpenAIBackend.capabilities.independent_requests and not HFBackend.capabilities.independent_requests
    assert HFBackend.capabilities.ats and not OpenAIBackend.capabilities.ats
    assert ReplayBackend.capabilities == Capabilities()
    assert issubclass(OpenAIBatchError, BatchGenerationError)
