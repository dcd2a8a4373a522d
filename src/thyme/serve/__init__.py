"""``thyme serve``: the whole Thyme loop behind an OpenAI-compatible HTTP API.

- :mod:`thyme.serve.config`   :class:`ServeConfig` (YAML section ``serve``): address, access, limits
- :mod:`thyme.serve.inputs`   a request's user message -> question and checked image files
- :mod:`thyme.serve.service`  admission (sessions, queue), one trajectory per request, the ``thyme`` field
- :mod:`thyme.serve.app`      the FastAPI app: ``/v1/chat/completions`` (plain and streamed), ``/health``, ``/v1/models``
- :mod:`thyme.serve.server`   the access rule and API key, the socket, uvicorn

Floor 6 (beside ``report``): imports the agent, the sandbox's interface and the ground floor;
the backend is built by the command (:mod:`thyme.cli.serve`) through the registry and handed in.
FastAPI and uvicorn are imported only when a server is built (extra ``serve``).
"""

from .config import SERVE_API_KEY_ENV, ServeConfig
from .inputs import RequestError
from .service import Service

__all__ = ["SERVE_API_KEY_ENV", "RequestError", "ServeConfig", "Service"]
