"""Tiny random checkpoints of the real Qwen VL architectures, written offline in about a second.

A checkpoint written here is laid out like the hub repositories (``config.json``,
``generation_config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``,
``preprocessor_config.json``, ``chat_template.json``) and loads with
``AutoProcessor.from_pretrained(dir)`` (through :func:`thyme.backends.processors.load_processor`
when torchvision is missing) and ``AutoModelForImageTextToText.from_pretrained(dir)``. The
weights are random: generations are gibberish, but every code path of the real models runs
(vision tower, patch merger, M-RoPE, image-token splicing, chat template), which is what the
runtime's tests need on a CPU without network access.

What is real and what is not:

- architecture classes, chat template (byte for byte the string shipped with the instruct
  checkpoints, see :data:`CHAT_TEMPLATES`), special tokens and their relative order, image
  processor settings (patch / merge / temporal patch sizes, pixel budget, normalisation);
- not real: the vocabulary (a ~2000-entry byte-level BPE trained here on built-in English,
  Python and Thyme-protocol text with the Qwen2 pre-tokenizer regex) and so the token ids,
  the sizes (hidden 64, 2 layers) and the weights.

Measured on a 2-core CPU: ~1 s for :func:`write_tiny_checkpoint` (mostly the BPE training),
checkpoint size ~1 MB.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

#: Architectures :func:`write_tiny_checkpoint` can build.
ARCHS = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")

# --------------------------------------------------------------------------- chat templates

#: The chat template of ``Qwen/Qwen2.5-VL-7B-Instruct`` (``chat_template.json``), identical to the
#: one of ``Qwen/Qwen2-VL-7B-Instruct``. Source: the hub repositories' ``chat_template.json``, as
#: quoted in transformers' ``tests/models/qwen2_5_vl/test_processor_qwen2_5_vl.py``
#: (``prepare_processor_dict``). Images render as ``<|vision_start|><|image_pad|><|vision_end|>``,
#: a missing system message becomes "You are a helpful assistant.".
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: The chat template of ``Qwen/Qwen3-VL-8B-Instruct`` (5292 bytes, SHA-256
#: ``3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4``, the value pinned by a
#: public test that quotes the template of the official GGUF export; :data:`QWEN3_VL_TEMPLATE_SHA256`
#: is checked by the tests). Unlike Qwen2.5-VL it adds no default system message.
QWEN3_VL_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

#: Expected SHA-256 of :data:`QWEN3_VL_CHAT_TEMPLATE` (UTF-8).
QWEN3_VL_TEMPLATE_SHA256 = "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"

#: ``arch -> chat template`` (the exact strings shipped with the instruct checkpoints).
CHAT_TEMPLATES = {
    "qwen2_5_vl": QWEN2_VL_CHAT_TEMPLATE,
    "qwen2_vl": QWEN2_VL_CHAT_TEMPLATE,
    "qwen3_vl": QWEN3_VL_CHAT_TEMPLATE,
}

# --------------------------------------------------------------------------- tokens

#: Special tokens of the Qwen2-VL / Qwen2.5-VL / Qwen3-VL tokenizers, in id order (after the
#: regular vocabulary; ``<|endoftext|>`` is 151643 in the real ones, ``<|video_pad|>`` 151656).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
#: Added, non-special tokens that follow them (151657..151664 in Qwen2.5-VL).
QWEN_ADDED_TOKENS = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
#: Extra added tokens of the Qwen3 family (151665..151668), so ``<think>`` is one token there.
QWEN3_ADDED_TOKENS = ["<tool_response>", "</tool_response>", "<think>", "</think>"]

#: The Qwen2 pre-tokenizer split regex (transformers ``models/qwen2/tokenization_qwen2.py``).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

#: Regular (non-special) vocabulary size the BPE is trained to.
BPE_VOCAB_SIZE = 2000

# Built-in training text: English, Python image code and the Thyme protocol's tags, so that a
# Thyme trajectory tokenises into plausible pieces (``<code>``, ``</code>``, ``python`` ...).
_ENGLISH = """\
You are a helpful assistant. Solve the following problem step by step, and optionally write
Python code for image manipulation to enhance your reasoning process. The Python code will be
executed by an external sandbox, and the processed image or result can be returned to aid your
reasoning and help you arrive at the final answer.
The user asks a question about the image. The question is about a small object in the upper left
corner of the picture. To answer it, I need to look more closely at that region, so I will crop
the region of interest and zoom in on it. The text on the sign is too small to read at this
resolution. After cropping, the sign clearly reads the name of the street. The image is rotated
by ninety degrees, so I will rotate it back before reading the label. The contrast is low; let me
enhance the contrast and the brightness. Now the details are visible. The answer is the second
option. Based on the cropped image, the color of the car is red, and there are three people
standing near the door. The chart shows that the value increased from 2019 to 2023. Let me
compute the area of the triangle: the base is 12 and the height is 5, so the area is 30.
What is the number written on the blue board? Which of the following options is correct?
Answer with the option's letter from the given choices directly. Please think step by step.
The width and the height of the image are given in pixels. The coordinates of the bounding box
are x1, y1, x2 and y2. I should make sure the crop stays inside the image boundaries.
Hmm, the previous crop did not include the whole label; I will expand the box a little.
This is a photo of a kitchen with a table, two chairs, a window and a plant on the shelf.
The person is holding an umbrella and walking a dog along the river in the rain.
The time on the clock is ten past eight. The price on the tag is 4.99 dollars.
There is an error in the code. Let me fix the path and run it again.
Therefore, the final answer is A. So the answer is 42. In summary, the image shows a bridge.
"""

_PYTHON = """\
import cv2
import os
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

image_path = "/tmp/images/input.jpg"
img = cv2.imread(image_path)
h, w = img.shape[:2]
x1, y1, x2, y2 = 120, 80, 420, 360
x1, y1 = max(0, x1), max(0, y1)
x2, y2 = min(w, x2), min(h, y2)
cropped = img[y1:y2, x1:x2]
zoomed = cv2.resize(cropped, None, fx=2.0, fy=2.0, interpolation=cv2.INTER_CUBIC)
processed_path = os.path.join("/tmp/images", "cropped_zoomed.jpg")
cv2.imwrite(processed_path, zoomed)
print(processed_path)

image = Image.open(image_path).convert("RGB")
width, height = image.size
rotated = image.rotate(90, expand=True)
enhancer = ImageEnhance.Contrast(rotated)
enhanced = enhancer.enhance(1.8)
output_path = "/tmp/images/enhanced.png"
enhanced.save(output_path)
print(output_path)

def compute_area(base, height):
    return 0.5 * base * height

result = compute_area(12, 5)
print(f"The area is {result}")
values = [3, 5, 8, 13, 21]
total = sum(values) / len(values)
for i, v in enumerate(values):
    if v > total:
        print(i, v)
gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
_, binary = cv2.threshold(gray, 128, 255, cv2.THRESH_BINARY)
arr = np.array(image, dtype=np.float32) / 255.0
mean = arr.mean(axis=(0, 1))
"""

_THYME = """\
<think>The question asks about the text on the sign. The sign is small, so I will crop it.
<code>
```python
import cv2
img = cv2.imread("/tmp/images/input.jpg")
crop = img[100:300, 200:500]
cv2.imwrite("/tmp/images/crop.jpg", crop)
print("/tmp/images/crop.jpg")
```
</code>
<sandbox_output><|vision_start|><|image_pad|><|vision_end|></sandbox_output>The cropped image shows the sign clearly.
<code>
```python
print(12 * 5 / 2)
```
</code>
<sandbox_output>30.0
</sandbox_output>The area is 30.</think>
<answer>B</answer>
<sandbox_output>Traceback (most recent call last):
  File "<string>", line 3, in <module>
NameError: name 'img' is not defined
</sandbox_output>
<image>
User Image Path: "/tmp/images/input.jpg"
User Image Size: "640x480"
Output Format (strict adherence required):
<think>Your detailed reasoning process, including any code, should go here.</think>
<answer>Your final answer to the user's question goes here.</answer>
"""

_MORE_ENGLISH = """\
Visual question answering asks a model to look at a photograph, a diagram, a document or a
screenshot and answer a question in natural language. High-resolution images often contain tiny
details: street names, license plates, menus, receipts, handwritten notes, map legends, tables
with many rows and columns, and scientific figures with axes, ticks and captions. A model that can
write and execute code is able to zoom, rotate, sharpen, denoise, binarize, measure distances,
count objects and calculate statistics before it commits to an answer.
Mathematics problems ask for angles, lengths, probabilities, percentages, ratios, equations,
functions, derivatives, integrals, sequences, matrices and geometry proofs. For example: a circle
has radius seven centimeters; find its circumference and area, rounding to two decimal places.
A train travels two hundred kilometers in two and a half hours; what is its average speed?
If the probability of rain on Monday is forty percent, what is the probability of no rain?
Reading comprehension: the document describes the quarterly revenue of a company, its operating
expenses, net income, employees, offices in several countries, and a forecast for next year.
Everyday scenes: a market with fruit and vegetables, bicycles parked beside a fence, children
playing football in a park, a cat sleeping on a sofa, mountains covered with snow behind a lake,
airplanes at an airport gate, boats in a harbor, traffic lights at a busy intersection at night.
Careful reasoning means checking each step, verifying intermediate results, reconsidering when
something looks wrong, and stating the final answer clearly and concisely without hesitation.
Questions may come with multiple choices labelled A, B, C, D and E; respond with a single letter.
Sometimes the answer is a word or a short phrase, a number with units, a date, a time or a yes
or no. Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. January, February, March,
April, May, June, July, August, September, October, November, December. North, south, east, west.
Colors: red, orange, yellow, green, blue, purple, pink, brown, black, white, gray, silver, gold.
Shapes: square, rectangle, triangle, circle, ellipse, polygon, hexagon, cube, sphere, cylinder.
Numbers: zero, one, two, three, four, five, six, seven, eight, nine, ten, hundred, thousand.
"""

_MORE_PYTHON = """\
import math
import json
import re
from pathlib import Path
from collections import Counter, defaultdict


class Region:
    \"\"\"A rectangular region of interest in pixel coordinates.\"\"\"

    def __init__(self, left: int, top: int, right: int, bottom: int) -> None:
        self.left, self.top, self.right, self.bottom = left, top, right, bottom

    @property
    def area(self) -> int:
        return max(0, self.right - self.left) * max(0, self.bottom - self.top)

    def clip(self, width: int, height: int) -> "Region":
        return Region(max(0, self.left), max(0, self.top), min(width, self.right), min(height, self.bottom))


def sharpen(image: np.ndarray) -> np.ndarray:
    kernel = np.array([[0, -1, 0], [-1, 5, -1], [0, -1, 0]], dtype=np.float32)
    return cv2.filter2D(image, -1, kernel)


def count_words(text: str) -> dict:
    counts = Counter(re.findall(r"[a-z]+", text.lower()))
    return dict(counts.most_common(10))


try:
    data = json.loads(Path("result.json").read_text())
except (FileNotFoundError, ValueError) as error:
    print("failed:", error)
    data = {}
else:
    print(len(data))
finally:
    print("done")

angle = math.degrees(math.atan2(3, 4))
radius = 7
circumference = 2 * math.pi * radius
print(round(circumference, 2), round(math.pi * radius ** 2, 2), math.sqrt(2), angle)
blurred = cv2.GaussianBlur(gray, (5, 5), 0)
edges = cv2.Canny(blurred, 50, 150)
contours, hierarchy = cv2.findContours(edges, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
boxes = [cv2.boundingRect(c) for c in contours if cv2.contourArea(c) > 100]
while boxes and len(boxes) > 5:
    boxes.pop()
matrix = np.zeros((3, 3), dtype=np.int64)
assert matrix.sum() == 0, "matrix must be empty"
lambda_values = list(map(lambda v: v * 2, range(10)))
is_valid = True and not False or None
"""


def training_text() -> list[str]:
    """The built-in BPE training text (deterministic: the same list on every call)."""
    return [_ENGLISH, _MORE_ENGLISH, _PYTHON, _MORE_PYTHON, _THYME] * 4


def build_tokenizer(arch: str = "qwen2_5_vl"):
    """Train the tiny byte-level BPE and wrap it as a transformers ``Qwen2Tokenizer``.

    The pipeline is Qwen2's (NFC normaliser, :data:`QWEN2_PRETOKENIZE_REGEX` split, ByteLevel
    without prefix space, ByteLevel decoder). The regular vocabulary (:data:`BPE_VOCAB_SIZE`
    entries) comes first, then :data:`QWEN_SPECIAL_TOKENS` (special), then the added tokens,
    as in the real tokenizers. ``eos`` is ``<|im_end|>``, ``pad`` ``<|endoftext|>``, no ``bos``
    or ``unk`` (Qwen2.5-VL's ``tokenizer_config.json``).

    Returns:
        ``transformers.Qwen2Tokenizer``; deterministic (BPE training on fixed text).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer

    _check_arch(arch)
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    added = QWEN_ADDED_TOKENS + (QWEN3_ADDED_TOKENS if arch == "qwen3_vl" else [])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return Qwen2Tokenizer(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        errors="replace",
    )


# --------------------------------------------------------------------------- processor


def image_processor_config(arch: str) -> dict[str, Any]:
    """``preprocessor_config.json`` as the hub repositories ship it (pixel budget in pixels).

    Qwen2-VL / Qwen2.5-VL: patch 14, merge 2, temporal patch 2, ``min_pixels`` 3136 (56x56),
    ``max_pixels`` 12845056 (28x28x16384), CLIP mean / std. Qwen3-VL: patch 16,
    ``size = {shortest_edge: 65536, longest_edge: 16777216}``, mean / std 0.5.
    """
    _check_arch(arch)
    if arch == "qwen3_vl":
        return {
            "size": {"longest_edge": 16777216, "shortest_edge": 65536},
            "patch_size": 16,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "processor_class": "Qwen3VLProcessor",
            "image_processor_type": "Qwen2VLImageProcessorFast",
        }
    return {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor" if arch == "qwen2_5_vl" else "Qwen2VLProcessor",
    }


def _video_processor_config(arch: str) -> dict[str, Any] | None:
    """``video_preprocessor_config.json`` (Qwen3-VL ships one; for users with torchvision)."""
    if arch != "qwen3_vl":
        return None
    return {
        "size": {"longest_edge": 25165824, "shortest_edge": 4096},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor",
        "video_processor_type": "Qwen3VLVideoProcessor",
    }


# --------------------------------------------------------------------------- model config


#: Text head sizes :func:`model_config` makes: 16 (4 heads, 2 KV heads: the default, what the
#: test suite's checkpoints use) and 32 (2 heads, 1 KV head over the same hidden size: vLLM's CPU
#: attention supports head sizes 32, 64, 80, ... 512 and kills the engine on 16).
HEAD_DIMS = (16, 32)


def model_config(arch: str, tokenizer, head_dim: int = 16) -> Any:
    """The tiny transformers config of ``arch`` with token ids taken from ``tokenizer``.

    Text: hidden 64, 2 layers, 4 heads and 2 KV heads of head_dim 16 (``head_dim=32``: 2 heads,
    1 KV head, for vLLM's CPU build), M-RoPE ``mrope_section`` summing to head_dim / 2
    (``[2, 3, 3]`` / ``[4, 6, 6]``; Qwen3-VL interleaved ``[3, 3, 2]`` / ``[6, 5, 5]``),
    vocabulary = ``len(tokenizer)``. Vision: depth 2, hidden 64, 4 heads, the real patch sizes;
    Qwen2.5-VL window attention with the last block full-attention; Qwen3-VL deepstack from both
    blocks.

    Raises:
        ValueError: unknown ``arch`` or a ``head_dim`` not in :data:`HEAD_DIMS`.
    """
    from transformers import AutoConfig

    _check_arch(arch)
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim!r} is not one of {HEAD_DIMS} (32 for vLLM's CPU attention)")
    heads = 64 // head_dim
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vocab = len(tokenizer)
    common_text = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        use_cache=True,
    )
    token_ids = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    if arch == "qwen3_vl":
        text = dict(
            common_text,
            head_dim=head_dim,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [3, 3, 2] if head_dim == 16 else [6, 5, 5],
                "mrope_interleaved": True,
            },
            attention_bias=False,
            pad_token_id=ids["<|endoftext|>"],
        )
        vision = dict(
            depth=2,
            hidden_size=64,
            hidden_act="gelu_pytorch_tanh",
            intermediate_size=128,
            num_heads=4,
            in_channels=3,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[0, 1],
        )
        return AutoConfig.for_model("qwen3_vl", text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids)
    text = dict(
        common_text,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3] if head_dim == 16 else [4, 6, 6]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        use_sliding_window=False,
        sliding_window=32768,
        max_window_layers=2,
    )
    if arch == "qwen2_5_vl":
        vision = dict(
            depth=2,
            hidden_size=64,
            hidden_act="silu",
            intermediate_size=128,
            num_heads=4,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            tokens_per_second=2,
            window_size=112,
            out_hidden_size=64,
            fullatt_block_indexes=[1],
        )
    else:  # qwen2_vl
        vision = dict(
            depth=2,
            embed_dim=64,
            hidden_size=64,
            hidden_act="quick_gelu",
            mlp_ratio=2,
            num_heads=4,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
    return AutoConfig.for_model(arch, text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids)


# --------------------------------------------------------------------------- writer


def write_tiny_checkpoint(out_dir: str | os.PathLike, arch: str = "qwen2_5_vl", seed: int = 0, head_dim: int = 16) -> Path:
    """Write a tiny random checkpoint of ``arch`` into ``out_dir`` (created if missing).

    Args:
        out_dir: target folder; existing files of the same names are overwritten.
        arch: one of :data:`ARCHS` (``qwen2_5_vl``, ``qwen2_vl``, ``qwen3_vl``).
        seed: seeds the random weights (``torch.manual_seed``); the tokenizer is deterministic.
        head_dim: text attention head size, 16 or 32 (32: servable by vLLM's CPU build; see
            :data:`HEAD_DIMS`).

    Returns:
        The folder, as a :class:`~pathlib.Path`, loadable with
        ``thyme.backends.processors.load_processor(dir)`` / ``AutoProcessor.from_pretrained(dir)``
        (the latter needs torchvision for the Qwen processors' video half) and
        ``AutoModelForImageTextToText.from_pretrained(dir)``.

    Raises:
        ValueError: unknown ``arch`` or ``head_dim``.

    Files: ``config.json``, ``generation_config.json`` (eos ``<|im_end|>`` and ``<|endoftext|>``,
    pad ``<|endoftext|>``, greedy), ``model.safetensors`` (float32, ~1 MB),
    ``tokenizer.json`` / ``tokenizer_config.json``, ``preprocessor_config.json``
    (:func:`image_processor_config`), ``chat_template.json`` (:data:`CHAT_TEMPLATES`), and for
    Qwen3-VL ``video_preprocessor_config.json``. About a second on a 2-core CPU.
    """
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    _check_arch(arch)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(arch)
    tokenizer.save_pretrained(out)
    # The processor class the hub repositories name (AutoProcessor dispatches on it).
    pre = image_processor_config(arch)
    _patch_json(out / "tokenizer_config.json", {"processor_class": pre["processor_class"]})
    _write_json(out / "preprocessor_config.json", pre)
    video = _video_processor_config(arch)
    if video is not None:
        _write_json(out / "video_preprocessor_config.json", video)
    _write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATES[arch]})

    config = model_config(arch, tokenizer, head_dim=head_dim)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)  # leave the caller's RNG stream as it was
    model.eval()
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=eos,
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        do_sample=False,
    )
    with _quiet_progress_bars():
        model.save_pretrained(out, safe_serialization=True)
    return out


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet_progress_bars():
    """Hide transformers' "Writing model shards" bar for a 1 MB file (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny-checkpoint arch {arch!r}; choose one of {', '.join(ARCHS)}")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _patch_json(path: Path, updates: dict[str, Any]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(updates)
    _write_json(path, data)
