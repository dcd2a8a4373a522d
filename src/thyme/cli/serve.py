"""``thyme serve``: the whole Thyme loop behind an OpenAI-compatible API (:mod:`thyme.serve`).

The model is a checkpoint loaded here (``--model CKPT``, the ``hf`` backend) or one served by a
vLLM / SGLang / OpenAI-compatible server (``--base-url URL --model NAME``, the ``openai``
backend), chosen by :func:`thyme.cli.backend.choose_backend` and built by the registry, as for
``thyme run``. Settings: defaults <- ``--config`` sections ``serve``, ``agent``, ``sandbox``,
``model`` <- flags.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .backend import add_server_flags, choose_backend
from .entry import add_agent_flags, add_config_flag, add_hf_flags, add_sandbox_flags, agent_config, load_sections, sandbox_config

#: The backends ``serve`` offers (:mod:`thyme.rollout.registry`).
SERVE_BACKENDS = ("hf", "openai")
#: ServeConfig fields exposed as flags (all of them).
SERVE_FLAGS = (
    "host",
    "port",
    "served_model_name",
    "content",
    "allow_path",
    "allow_url_fetch",
    "allow_private_urls",
    "max_sessions",
    "max_queue",
    "retry_after_s",
    "max_images",
    "max_image_bytes",
    "max_image_pixels",
    "max_question_chars",
    "fetch_timeout_s",
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``thyme serve`` on the ``thyme`` sub-command parser; returns the new parser."""
    from ..config import add_fields
    from ..serve.config import SERVE_API_KEY_ENV, ServeConfig

    p = subparsers.add_parser("serve", help="serve the whole Thyme loop behind an OpenAI-compatible API (/v1/chat/completions)")
    p.add_argument("--model", required=True, help="checkpoint folder or hub id; with --base-url: the upstream server's model name")
    g = p.add_argument_group("server (YAML section serve)")
    add_fields(g, ServeConfig, SERVE_FLAGS)
    g.add_argument("--port-file", default=None, help="write the bound port here once listening (with --port 0)")
    g.add_argument(
        "--api-key-file",
        default=None,
        help=f"file whose first line is the API key clients must send as 'Authorization: Bearer KEY' (else ${SERVE_API_KEY_ENV}); required to bind a non-loopback --host",
    )
    add_agent_flags(p)
    add_hf_flags(p, title="model (transformers backend; pixel budget also for --base-url; YAML section model)")
    add_server_flags(p)
    add_sandbox_flags(p)
    add_config_flag(p, "serve/agent/sandbox/model")
    return p


def serve_config(args: argparse.Namespace, yaml_cfg: dict[str, Any]) -> Any:
    """:class:`thyme.serve.ServeConfig` from defaults <- section ``serve`` <- flags.

    Raises:
        ThymeError: an unknown key in the section, or a value out of range.
    """
    from ..config import build
    from ..serve import ServeConfig

    return build(ServeConfig, yaml_cfg.get("serve"), args, names=SERVE_FLAGS, section_name="serve")


def warm_up(backend: Any) -> None:
    """Do before serving what the first request would otherwise wait for: a backend that encodes
    images for upload (``openai``) loads its image codecs with the first image, so encode one
    tiny image now. (Its resizer no longer imports transformers, which took 3-5 s and ~340 MiB
    on a 2-core machine.) Best effort: a failure here is the first request's to report."""
    encode = getattr(backend, "encode", None)
    if not callable(encode):
        return
    from PIL import Image

    try:
        encode(Image.new("RGB", (28, 28)))
    except Exception:  # noqa: BLE001 - the first real request says what is wrong
        pass


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``thyme serve`` until Ctrl-C / SIGTERM."""
    from ..sandbox import Sandbox
    from ..serve import Service
    from ..serve.server import api_key, check_access, serve

    yaml_cfg = load_sections(args, {"serve", "agent", "sandbox", "model"})
    cfg = serve_config(args, yaml_cfg)
    key = api_key(args.api_key_file)
    check_access(cfg.host, key)  # before anything loads
    agent_cfg = agent_config(args, yaml_cfg)
    choice = choose_backend(args, yaml_cfg, kinds=SERVE_BACKENDS)
    with Sandbox(sandbox_config(args, yaml_cfg)) as sandbox:
        print(f"loading {args.model} ..." if choice.local else f"using {args.model} at {args.base_url} ...", file=sys.stderr)
        backend = choice.factory()()
        with backend:
            check_server = getattr(backend, "check_server", None)
            if callable(check_server):  # down, mistyped URL, wrong model name: one clear error before serving
                check_server()
            warm_up(backend)
            service = Service(backend, sandbox, agent_cfg, cfg, model_name=cfg.served_model_name or args.model, local=choice.local)
            try:
                serve(service, cfg, key=key, port_file=args.port_file)
            finally:
                service.close()
    return 0
