"""The real Label Studio of ``make test-labelstudio`` (``.ci/labelstudio.py`` starts it and sets
these variables): the review and annotate round trips share its settings and the ``server``
fixture (two annotators' clients), which skips without a server and fails under
``THYME_REQUIRE_LABEL_STUDIO=1``."""

from __future__ import annotations

import os

import pytest

URL = os.environ.get("THYME_LABEL_STUDIO_URL")
TOKEN = os.environ.get("THYME_LABEL_STUDIO_TOKEN")
TOKEN_2 = os.environ.get("THYME_LABEL_STUDIO_TOKEN_2")
FILES_ROOT = os.environ.get("THYME_LABEL_STUDIO_FILES_ROOT")
STRICT = os.environ.get("THYME_REQUIRE_LABEL_STUDIO") == "1"


@pytest.fixture
def server():
    """``(first annotator's client, second annotator's client)`` of the running server."""
    from thyme.data.labelstudio import LabelStudio

    if not (URL and TOKEN and TOKEN_2):
        msg = (
            "no Label Studio server: set THYME_LABEL_STUDIO_URL, THYME_LABEL_STUDIO_TOKEN and THYME_LABEL_STUDIO_TOKEN_2"
            " (make test-labelstudio does)"
        )
        if STRICT:
            pytest.fail(msg + " [THYME_REQUIRE_LABEL_STUDIO=1]")
        pytest.skip(msg)
    one, two = LabelStudio(URL, TOKEN), LabelStudio(URL, TOKEN_2)
    assert one.health(), f"Label Studio at {URL} does not answer /health"
    return one, two
