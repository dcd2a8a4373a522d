"""One execution from files, for ``thyme sandbox exec`` (the CLI parses arguments and calls this)."""

from __future__ import annotations

import os
import time
from typing import Any

from thyme.sandbox.outputs import copy_output
from thyme.sandbox.result import ExecResult


def exec_file(image: str | os.PathLike | list | None, code_path: str | os.PathLike, timeout_s: float | None = None, out_dir: str | os.PathLike | None = None, config: Any = None) -> ExecResult:
    """Run the code in ``code_path`` once, in a fresh sandbox, on ``image`` (one path, a list, or None).

    Result images are copied to ``out_dir`` (default: a new folder ``thyme-sandbox-<time>``
    under the current directory) and ``ExecResult.images`` lists those copies, so the paths
    stay valid after the sandbox deletes its session folder.

    Raises:
        FileNotFoundError: ``code_path`` is missing. ImageError: an input is missing.
        OutputRefused: an output changed into something the caller will not copy (a link,
            a hard link, over the byte or pixel budget) after the run.
        SandboxError / ConfinementError: the sandbox cannot start.
    """
    from thyme.sandbox.sandbox import Sandbox

    with open(code_path, encoding="utf-8") as f:
        code = f.read()
    images = [] if image is None else ([image] if isinstance(image, (str, os.PathLike)) else list(image))
    overrides = {} if timeout_s is None else {"timeout_s": float(timeout_s)}
    with Sandbox(config, **overrides) as sandbox:
        with sandbox.session(images=images) as session:
            result = session.run(code)
            if result.images:
                dest = os.path.abspath(out_dir) if out_dir else os.path.abspath(f"thyme-sandbox-{time.strftime('%Y%m%d-%H%M%S')}")
                os.makedirs(dest, exist_ok=True)
                copies = []
                for p in result.images:
                    rel = os.path.relpath(p, session.dir).replace(os.sep, "__")
                    target = os.path.join(dest, rel)
                    # one O_NOFOLLOW descriptor, checked and copied from (never reopened by path)
                    copy_output(p, target, int(sandbox.config.max_output_file_bytes), int(sandbox.config.max_output_pixels))
                    copies.append(target)
                result.images = copies
    return result
