#!/usr/bin/env python3
"""Print the requirement lines of the veRL (and vLLM) test environments, one a line.

The veRL extra is its own environment: veRL 0.9.x requires ``transformers>=5.5.3,<5.11``
while the core's tested set may pin a newer transformers. This prints the core dependencies
and the extras named on the command line (default: ``verl dev train eval``) from pyproject.toml,
with the version specifiers of the Hugging Face stack (transformers, tokenizers,
huggingface-hub) dropped, so that pip resolves them within veRL's range. Pinned or ranged
core dependencies both work. Used by ``make venv-verl``:
``pip install -r <(python .ci/verl_requirements.py) && pip install --no-deps -e .``.

``--keep-torch`` leaves torch unpinned too (GPU machines: keep the torch that the installed
vLLM was built for, e.g. after ``pip install 'verl[vllm]==0.9.1'``; ``make venv-vllm``: keep
vLLM's, with ``--keep-torch dev eval``).
``make venv-lmms-eval`` prints ``dev eval testing lmms-eval`` (installed with ``-c constraints.txt``).
"""
import re
import sys
import tomllib
from pathlib import Path

RELAXED = {"transformers", "tokenizers", "huggingface-hub", "huggingface_hub"}


def main(argv):
    relaxed = set(RELAXED) | ({"torch"} if "--keep-torch" in argv else set())
    extras = [a for a in argv if not a.startswith("--")] or ["verl", "dev", "train", "eval"]
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.\-]+", line).group(0)
        print(name if name.lower() in relaxed else line)
    for extra in extras:
        for line in project["optional-dependencies"][extra]:
            print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
