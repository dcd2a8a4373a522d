"""Settings of ``thyme serve`` (YAML section ``serve``): where it listens, what a request may ask.

Every field is a :func:`thyme.config.setting`; the command's flags and ``--help`` come from
here. Limits are per request: a request over an image limit is refused with a 400 naming the
limit; rounds and tokens a request asks above the server's agent settings (``max_rounds``,
``max_total_tokens``: section ``agent``) are clamped to them (the response's
``thyme.limits`` says what applied).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import check_ranges, setting

#: Environment variable holding the server's API key (``--api-key-file`` wins over it).
SERVE_API_KEY_ENV = "THYME_SERVE_API_KEY"


@dataclass
class ServeConfig:
    """What ``thyme serve`` listens on and what one request may take (module docstring)."""

    host: str = setting("127.0.0.1", help="address to bind; anything but loopback needs an API key", source="ours")
    port: int = setting(8000, help="TCP port (0: a free one, written to --port-file)", source="ours", valid={"ge": 0, "le": 65535})
    served_model_name: str | None = setting(
        None, help="the model name /v1/models lists and responses carry (default: --model)", source="ours"
    )
    content: Literal["answer", "full"] = setting(
        "answer",
        help="choices[0].message.content: 'answer' (the final answer) or 'full' (the whole response text, code and sandbox output included)",
        source="ours",
    )
    allow_path: list[str] = setting(
        default_factory=list,
        help="folder under which local image paths (or file:// URLs) may be read (repeatable; none: no local paths)",
        source="ours (VLMEvalKit --local-media sends paths)",
    )
    allow_url_fetch: bool = setting(False, help="fetch http(s) image URLs (through thyme.http, size- and time-limited)", source="ours")
    allow_private_urls: bool = setting(
        False,
        help="with allow_url_fetch: also fetch URLs whose host is a loopback, private or link-local address (otherwise refused: the server must not be a proxy into its own network)",
        source="ours",
    )
    max_sessions: int = setting(4, help="trajectories running at once", source="ours", valid={"ge": 1})
    max_queue: int = setting(16, help="requests waiting for a session; beyond, 429 with Retry-After", source="ours", valid={"ge": 0})
    retry_after_s: int = setting(5, help="Retry-After (seconds) of a 429", source="ours", valid={"ge": 1})
    max_images: int = setting(4, help="input images per request (more: 400)", source="ours", valid={"ge": 1})
    max_image_bytes: int = setting(
        20 * 1024 * 1024, help="encoded bytes of one input image (more: 400)", source="ours (OpenAI's 20 MB)", valid={"ge": 1}
    )
    max_image_pixels: int = setting(
        50_000_000, help="pixels (width * height) of one input image (more: 400)", source="ours: above 8K photos", valid={"ge": 1}
    )
    max_question_chars: int = setting(20_000, help="characters of the question text (more: 400)", source="ours", valid={"ge": 1})
    fetch_timeout_s: float = setting(20.0, help="seconds to fetch one image URL (--allow-url-fetch)", source="ours", valid={"gt": 0})

    def __post_init__(self) -> None:
        check_ranges(self)
