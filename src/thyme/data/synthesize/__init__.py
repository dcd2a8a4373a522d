"""``thyme data synthesize``: Thyme SFT data from seed rows with a teacher model (paper Sec. 3.1, Fig. 3).

:mod:`.scenarios` (the six scenarios, seeded transforms, prompt files), :mod:`.teacher` (the
OpenAI-compatible teacher client), :mod:`.stages` (the stage rules and rejection reasons),
:mod:`.pipeline` (rows in, funnel and records out), :mod:`.workers` (the sandbox side on
``--workers`` processes or Ray, the teacher calls staying in the caller).
"""

from .pipeline import SynthConfig, SynthSummary, format_funnel, funnel_of, load_seeds, rejected_path_of, synthesize
from .scenarios import SCENARIOS, load_prompts
from .stages import STAGES, Rejection
from .teacher import TeacherClient, TeacherConfig, TeacherError

__all__ = [
    "SCENARIOS",
    "STAGES",
    "Rejection",
    "SynthConfig",
    "SynthSummary",
    "TeacherClient",
    "TeacherConfig",
    "TeacherError",
    "format_funnel",
    "funnel_of",
    "load_prompts",
    "load_seeds",
    "rejected_path_of",
    "synthesize",
]
