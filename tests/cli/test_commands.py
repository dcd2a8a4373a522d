"""The ``thyme`` command itself: what every user meets before any subcommand."""

from __future__ import annotations

import pytest


def test_thyme_version(capsys):
    """``thyme --version`` prints the package version (issue 8: a user reporting a bug needs it)."""
    import thyme
    from thyme.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"thyme {thyme.__version__}"
