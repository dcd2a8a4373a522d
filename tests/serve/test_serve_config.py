"""``thyme serve``'s settings: defaults <- ``--config`` section ``serve`` <- flags, keys checked."""

from __future__ import annotations

import pytest

from thyme.cli import build_parser
from thyme.cli.entry import load_sections
from thyme.cli.serve import serve_config
from thyme.errors import ThymeError


def _cfg(tmp_path, yaml_text, *flags):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    args = build_parser().parse_args(["serve", "--model", "m", "--config", str(f), *flags])
    return serve_config(args, load_sections(args, {"serve", "agent", "sandbox", "model"}))


def test_flags_override_the_serve_section(tmp_path):
    cfg = _cfg(tmp_path, "serve: {max_sessions: 7, max_images: 2, content: full}\n", "--max-sessions", "3", "--allow-path", "/a", "/b")
    assert (cfg.max_sessions, cfg.max_images, cfg.content, cfg.allow_path) == (3, 2, "full", ["/a", "/b"])
    assert cfg.host == "127.0.0.1" and cfg.allow_url_fetch is False  # the safe defaults


def test_an_unknown_key_or_a_bad_value_is_a_clear_error(tmp_path):
    with pytest.raises(ThymeError, match="max_session"):
        _cfg(tmp_path, "serve: {max_session: 7}\n")
    with pytest.raises((ThymeError, ValueError), match="max_sessions"):
        _cfg(tmp_path, "serve: {max_sessions: 0}\n")


def test_run_ignores_the_serve_section_of_a_shared_file(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("serve: {max_sessions: 2}\nagent: {max_rounds: 3}\n")
    args = build_parser().parse_args(["run", "--model", "m", "--image", "x.png", "--question", "q", "--config", str(f)])
    assert set(load_sections(args, {"agent", "sandbox", "model"})) == {"agent"}
    assert "section 'serve' is not used" in capsys.readouterr().err


def test_warm_up_loads_the_openai_backends_resizer_before_the_first_request():
    """``thyme serve`` encodes one tiny image before serving, so the first request does not pay
    for loading the image codecs; backends without ``encode`` are left alone."""
    from thyme.backends.openai import OpenAIBackend
    from thyme.cli.serve import warm_up

    backend = OpenAIBackend("http://127.0.0.1:9/v1", "m")
    try:
        warm_up(backend)
        assert backend.stats["images"] == 1
    finally:
        backend.close()
    warm_up(object())  # nothing to warm: no error
