"""A scripted teacher for ``thyme data synthesize``: an OpenAI-compatible loopback server
(``thyme dev teacher [--port 0] [--port-file F] [--fault-rate KIND=P ...]``) that answers the
pipeline's functional prompts from their content, with configurable faults.

It reads the prompt lines of the default prompt files (``[scenario: NAME]``, ``Image path:``,
``Image size:``, ``Target box ...: [x1, y1, x2, y2]``, ``Round 1 box ...``, ``Rotation applied
...: A``, ``Reference answer ...: X``) and writes what a good teacher would: reasoning without the
numbers, code that crops the given box with a margin and enlarges it, rotates the image back by
``-A``, stretches the contrast, or prints the computed value; after the sandbox output (a new user
turn) a closing sentence naming the answer and ``<answer>X</answer>``. As the verifier (``[verify]``)
it accepts when the last sentence of the reasoning names the final answer.

Faults (``--fault-rate KIND=P``: each row, identified by its question, gets fault ``KIND`` with
probability ``P``, decided by a hash, so every turn of the row sees the same decision; a question
holding ``#fault=KIND`` gets it always):

``syntax``       code that does not parse                  (parse / syntax_error)
``leak``         the box coordinates / angle in the text   (leak / leaked_coordinate, leaked_angle)
``crash``        code that raises                          (execute / code_error)
``wrong_box``    a crop elsewhere, a 180-degree turn, a contrast cut, no printed value  (goal / ...)
``wrong_answer`` a wrong final answer                      (answer / wrong_answer)
``inconsistent`` a closing sentence naming another answer  (consistency / verifier_rejected)
``bad_verdict``  the verifier replies without JSON         (consistency / judge_failed)
``http_error``   HTTP 500 on every call of the row         (teacher / http_error)
``hang``         no reply for ``hang_s`` seconds           (teacher / timeout)

``POST /debug/faults`` with ``{"KIND": P, ...}`` replaces the fault rates; ``GET /debug/stats``
counts requests. Loopback only (no authentication).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

FAULTS = ("syntax", "leak", "crash", "wrong_box", "wrong_answer", "inconsistent", "bad_verdict", "http_error", "hang")
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def parse_fault_rates(items: list[str] | None) -> dict[str, float]:
    """``["wrong_box=0.2", ...]`` -> ``{"wrong_box": 0.2}``.

    Raises:
        ValueError: an unknown kind or a rate outside [0, 1].
    """
    out: dict[str, float] = {}
    for item in items or []:
        kind, _, p = item.partition("=")
        kind = kind.strip()
        if kind not in FAULTS:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULTS)}")
        rate = float(p)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate of {kind} must be in [0, 1], got {p}")
        out[kind] = rate
    return out


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _field(text: str, label: str) -> str | None:
    m = re.search(r"^\s*" + re.escape(label) + r"[^:\n]*:\s*(.*)$", text, re.M)
    return m.group(1).strip() if m else None


def _box(text: str, label: str) -> list[int] | None:
    v = _field(text, label)
    if not v:
        return None
    nums = [int(x) for x in re.findall(r"-?\d+", v)]
    return nums[:4] if len(nums) >= 4 else None


class ScriptedTeacher:
    """The reply logic (no HTTP): :meth:`reply` maps a chat request body to ``(status, text)``."""

    def __init__(self, fault_rates: dict[str, float] | None = None, *, seed: int = 0, hang_s: float = 3600.0):
        self.fault_rates = dict(fault_rates or {})
        self.seed = seed
        self.hang_s = hang_s
        self.requests = 0
        self.authorization: list[str | None] = []  # the Authorization header of each chat request (tests)
        self.stop = threading.Event()

    def has(self, fault: str, question: str) -> bool:
        if f"#fault={fault}" in question:
            return True
        p = self.fault_rates.get(fault, 0.0)
        if p <= 0:
            return False
        h = int.from_bytes(hashlib.sha256(f"{self.seed}:{fault}:{question}".encode()).digest()[:8], "big") / 2**64
        return h < p

    def reply(self, body: dict[str, Any]) -> tuple[int, str]:
        self.requests += 1
        msgs = body.get("messages") or []
        users = [_text_of(m.get("content")) for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
        first = users[0] if users else ""
        question = _field(first, "Question") or first
        if "[verify]" in first:
            if self.has("bad_verdict", question):
                return 200, "I think it is fine."
            return 200, self._verify(first)
        if self.has("http_error", question):
            return 500, "scripted HTTP error"
        if self.has("hang", question):
            self.stop.wait(self.hang_s)
            return 503, "hang over"
        n_assist = sum(1 for m in msgs if isinstance(m, dict) and m.get("role") == "assistant")
        scen = (re.search(r"\[scenario: ([\w-]+)\]", first) or [None, ""])[1]
        answer = _field(first, "Reference answer") or ""
        if scen == "compute-code":
            return 200, self._compute_code(first, question)
        if scen == "no_code":
            return 200, self._final(
                question,
                answer,
                "Looking at the image as it is, the details the question asks about are clearly visible, so no processing is needed.",
            )
        if scen == "compute":
            if n_assist == 0:
                return 200, (
                    f"We set up the quantities given in the problem and apply the formula step by step; working it through gives values "
                    f"near {answer}, which the program will confirm."
                )
            return 200, self._final(question, answer, "The program confirms the computed value.")
        rounds = 2 if scen == "multi_round" else 1
        if n_assist < rounds:
            return 200, self._code_turn(scen, first, question, n_assist + 1)
        return 200, self._final(question, answer, "The processed image shows the detail clearly.")

    # ------------------------------------------------------------------ turns
    def _final(self, question: str, answer: str, lead: str) -> str:
        said = "something else entirely" if self.has("inconsistent", question) else answer
        given = "none of these" if self.has("wrong_answer", question) else answer
        return f"{lead} Therefore the answer is {said}.</think>\n<answer>{given}</answer>"

    def _code_turn(self, scen: str, prompt: str, question: str, k: int) -> str:
        path = _field(prompt, "Image path") or "image.png"
        size = re.findall(r"\d+", _field(prompt, "Image size") or "")
        W, H = (int(size[0]), int(size[1])) if len(size) >= 2 else (10**6, 10**6)
        name = Path(path).stem
        save = f'path = "/mnt/data/temp_processed_images/{name}_%d.png" % random.randint(1000, 9999)'
        lines = ["import random", "from PIL import Image", "", "# open the input image", f'img = Image.open("{path}")']
        reasoning = (
            "The question is about a detail that is hard to make out in the full view, so I will process the image to see it better."
        )
        if scen in ("crop", "multi_round"):
            box = _box(prompt, "Round 1 box") if (scen == "multi_round" and k == 1) else _box(prompt, "Target box")
            box = box or [0, 0, 10, 10]
            x1, y1, x2, y2 = box
            if self.has("wrong_box", question) and (scen == "crop" or k == 2):
                w, h = x2 - x1, y2 - y1  # a box of the same size in the far corner
                x1, y1 = (0 if x1 > W / 2 else W - w), (0 if y1 > H / 2 else H - h)
                x2, y2 = x1 + w, y1 + h
            else:
                mx, my = max(2, (x2 - x1) // 10), max(2, (y2 - y1) // 10)
                x1, y1, x2, y2 = max(0, x1 - mx), max(0, y1 - my), min(W, x2 + mx), min(H, y2 + my)
            lines += [
                "# crop the region holding the target, with a small margin",
                f"crop = img.crop(({x1}, {y1}, {x2}, {y2}))",
                "# enlarge it two times for a closer look",
                "crop = crop.resize((crop.width * 2, crop.height * 2))",
                save,
                "crop.save(path)",
            ]
            reasoning = (
                "The object the question asks about is small in the full view. I will crop the area around it and enlarge it."
                if k == 1
                else "This view is not close enough on the object, so a second, tighter crop is needed."
            )
            if self.has("leak", question):
                reasoning += f" The object lies between x={box[0]} and x={box[2]}."
        elif scen == "rotate":
            angle = int(re.findall(r"-?\d+", _field(prompt, "Rotation applied") or "0")[0])
            back = 180 - angle if self.has("wrong_box", question) else -angle
            lines += [
                "# turn the image back upright (PIL turns counter-clockwise)",
                f"up = img.rotate({back}, expand=True)",
                save,
                "up.save(path)",
            ]
            reasoning = "The content of the image runs at a slant, so it is not upright; I will rotate it back before reading it."
            if self.has("leak", question):
                reasoning += f" It was turned by {angle} degrees."
        elif scen == "contrast":
            lines = [
                "import random",
                "import numpy as np",
                "from PIL import Image",
                "",
                "# open the input image as grey levels",
                f'img = np.asarray(Image.open("{path}").convert("RGB"), dtype=np.float32)',
            ]
            if self.has("wrong_box", question):
                lines += ["# (a wrong step: this flattens the contrast further)", "out = img.mean() + 0.5 * (img - img.mean())"]
            else:
                lines += [
                    "# stretch the 1st..99th percentile of the levels to the full range",
                    "lo, hi = np.percentile(img, (1, 99))",
                    "out = (img - lo) * 255.0 / max(hi - lo, 1.0)",
                ]
            lines += ["out = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))", save, "out.save(path)"]
            reasoning = (
                "The image looks washed out: its dark and light parts are close in brightness, which makes it hard to read; "
                "I will stretch its contrast."
            )
        lines.append("# print the saved path last")
        lines.append("print(path)")
        if self.has("syntax", question):
            lines.insert(1, "def broken(:")
        if self.has("crash", question):
            lines.insert(1, "raise RuntimeError('scripted crash')")
        code = "\n".join(lines)
        return f"<think>{reasoning}\n<code>\n```python\n{code}\n```\n</code>"

    def _compute_code(self, prompt: str, question: str) -> str:
        nums = re.findall(r"near (.*?), which the program", prompt, re.S)
        values = nums[0] if nums else "0"
        if self.has("wrong_box", question):
            body = ["# (a wrong step: nothing numeric is printed)", 'print("done")']
        else:
            parts = [v.strip() for v in values.split(",")]
            body = [
                "# the values of the worked reasoning",
                f"values = [{', '.join(repr(p) for p in parts)}]",
                "# print them as the result",
                'print(", ".join(values))',
            ]
        if self.has("syntax", question):
            body.insert(0, "def broken(:")
        return "<code>\n```python\n" + "\n".join(body) + "\n```\n</code>"

    @staticmethod
    def _verify(prompt: str) -> str:
        final = _field(prompt, "Final answer") or ""
        m = re.search(r"<<<\n(.*)\n\s*>>>", prompt, re.S)
        example = m.group(1) if m else prompt
        think = example.split("</think>")[0]
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", think.strip()) if s.strip()]
        last = sentences[-1] if sentences else ""
        if final and re.search(r"(?<!\w)" + re.escape(final.lower()) + r"(?!\w)", last.lower()):
            return json.dumps({"verdict": "accept", "reason": "the closing sentence and the answer agree"})
        return json.dumps({"verdict": "reject", "reason": "rule 3: the last sentence does not state the final answer"})


def make_server(teacher: ScriptedTeacher, host: str = "127.0.0.1", port: int = 0, model: str = "scripted-teacher") -> ThreadingHTTPServer:
    """A threading HTTP server over ``teacher`` bound to ``host:port`` (loopback only).

    Raises:
        SystemExit: ``host`` is not a loopback address.
    """
    if host not in LOOPBACK:
        raise SystemExit(f"refusing to bind {host!r}: the scripted teacher has no authentication; use 127.0.0.1")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a: Any) -> None:  # quiet
            pass

        def _send(self, status: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a 'hang' fault past its deadline)
                pass

        def do_GET(self) -> None:
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                return self._send(200, {"object": "list", "data": [{"id": model, "object": "model"}]})
            if self.path == "/health":
                return self._send(200, {"ok": True})
            if self.path == "/debug/stats":
                return self._send(200, {"requests": teacher.requests, "fault_rates": teacher.fault_rates})
            self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            if n > 64 * 2**20:
                return self._send(413, {"error": "too large"})
            try:
                body = json.loads(self.rfile.read(n) or b"{}")
            except ValueError:
                return self._send(400, {"error": "not JSON"})
            if self.path == "/debug/faults":
                teacher.fault_rates = {k: float(v) for k, v in body.items() if k in FAULTS}
                return self._send(200, {"fault_rates": teacher.fault_rates})
            if not self.path.rstrip("/").endswith("/chat/completions"):
                return self._send(404, {"error": "not found"})
            teacher.authorization.append(self.headers.get("Authorization"))
            status, text = teacher.reply(body)
            if status != 200:
                return self._send(status, {"error": {"message": text}})
            prompt = sum(len(_text_of(m.get("content"))) for m in body.get("messages") or [] if isinstance(m, dict)) // 4
            self._send(
                200,
                {
                    "id": f"chatcmpl-{teacher.requests}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", model),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": prompt, "completion_tokens": len(text) // 4, "total_tokens": prompt + len(text) // 4},
                },
            )

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


class running_teacher:
    """``with running_teacher(faults) as (url, teacher):`` a scripted teacher on a free loopback
    port in a background thread (tests, benchmarks); stopped on exit."""

    def __init__(self, fault_rates: dict[str, float] | None = None, **kw: Any):
        self.teacher = ScriptedTeacher(fault_rates, **kw)

    def __enter__(self) -> tuple[str, ScriptedTeacher]:
        self.server = make_server(self.teacher)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="scripted-teacher")
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1", self.teacher

    def __exit__(self, *exc: Any) -> None:
        self.teacher.stop.set()
        self.server.shutdown()
        self.server.server_close()


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    port_file: str | None = None,
    fault_rates: dict[str, float] | None = None,
    seed: int = 0,
    hang_s: float = 3600.0,
) -> None:
    """Serve the scripted teacher until interrupted (blocks); the bound port goes to ``port_file``."""
    teacher = ScriptedTeacher(fault_rates, seed=seed, hang_s=hang_s)
    server = make_server(teacher, host, port)
    actual = server.server_address[1]
    if port_file:
        tmp = port_file + ".tmp"
        Path(tmp).write_text(str(actual))
        os.replace(tmp, port_file)
    print(f"thyme scripted teacher on http://{host}:{actual}/v1 (faults: {fault_rates or 'none'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        teacher.stop.set()
        server.server_close()
