"""Isolated execution of model code (the Thyme sandbox).

The model writes Python (crop, zoom, rotate, contrast, maths); a :class:`Session` runs it in a
confined process forked from a warm zygote and returns an :class:`ExecResult` (printed text, new
images, error with the model's own line numbers). See :mod:`thyme.sandbox.sandbox` and :mod:`thyme.sandbox.session` for the process
model, :mod:`thyme.sandbox.confine` for the layers, :mod:`thyme.sandbox.mountview` for the
bubblewrap mount view, :mod:`thyme.sandbox.decoded` for the decoded-input cache,
:mod:`thyme.sandbox.hooks` for the Thyme path conventions and :mod:`thyme.sandbox.repairs` for the
named code repairs.

Example::

    from thyme.sandbox import Sandbox
    with Sandbox(timeout_s=10) as sandbox, sandbox.session(images=["/abs/in.jpg"]) as s:
        r = s.run("import cv2; print(cv2.imread(image_path).shape)")
        print(r.ok, r.stdout, r.images)
"""

from thyme.sandbox.config import LAYERS, SandboxConfig
from thyme.sandbox.confine import Layer
from thyme.sandbox.doctor import doctor, format_doctor
from thyme.sandbox.errors import ConfinementError, OutDirError, SandboxError, SandboxWeakerWarning
from thyme.sandbox.oneshot import OutputFolder, exec_file
from thyme.sandbox.result import ExecError, ExecResult, Fix
from thyme.sandbox.sandbox import Sandbox
from thyme.sandbox.session import Session

__all__ = [
    "LAYERS",
    "ConfinementError",
    "ExecError",
    "ExecResult",
    "Fix",
    "Layer",
    "OutDirError",
    "OutputFolder",
    "Sandbox",
    "SandboxConfig",
    "SandboxError",
    "SandboxWeakerWarning",
    "Session",
    "doctor",
    "exec_file",
    "format_doctor",
]
