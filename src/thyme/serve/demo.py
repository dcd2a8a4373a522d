"""The web demo of ``thyme serve``: a static page at ``/`` that uses the server's own API.

The page (``web/index.html``, ``web/demo.js``, ``web/demo.css``, package data) uploads an
image, asks a question, ``POST``s ``/v1/chat/completions`` with ``stream: true`` and shows the
reasoning as it streams, each code block with its printed output and sandbox images, the crop
regions on the input image (the ``crops`` of the ``sandbox_output`` events and of the last
chunk's trajectory: :func:`thyme.serve.service.crop_boxes`), and the answer.

Access: the three files are static and carry no data, so they are served without the API key
(:data:`PUBLIC_PATHS`: ``GET`` / ``HEAD`` only); every API call the page makes carries the key
typed into its key field (``Authorization: Bearer``) and is refused without it (401, shown).

Hostile content (threat model: model text and sandbox output are attacker-controlled): the
script writes every model and sandbox string with ``textContent``, shows only images whose
``src`` is a ``data:image/`` URL the server produced (or the user's own upload), and the page is
served with a strict Content-Security-Policy (scripts and styles from this origin only, no
inline script, images from ``data:`` only, requests to this origin only) and
``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

#: path -> (file under ``thyme/serve/web``, media type)
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/demo.js": ("demo.js", "text/javascript; charset=utf-8"),
    "/static/demo.css": ("demo.css", "text/css; charset=utf-8"),
}
#: Paths served without the API key (GET and HEAD only): static files, no data.
PUBLIC_PATHS = frozenset(FILES)

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


def read_file(name: str) -> bytes:
    """One of the demo's files (package data under ``thyme/serve/web``)."""
    return resources.files("thyme.serve").joinpath("web", name).read_bytes()


def add_demo_routes(app: Any) -> None:
    """Serve the demo's files on ``app`` (a FastAPI app) at :data:`FILES`' paths, with :data:`HEADERS`."""
    from fastapi.responses import Response

    def route(body: bytes, media_type: str) -> Any:
        def serve() -> Any:  # no parameters: nothing of the request is read
            return Response(body, media_type=media_type, headers=HEADERS)

        return serve

    for path, (name, media_type) in FILES.items():
        app.add_api_route(path, route(read_file(name), media_type), methods=["GET", "HEAD"], include_in_schema=False)
