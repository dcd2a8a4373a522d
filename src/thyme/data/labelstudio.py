"""A small client of Label Studio's REST API: the calls the review round trip (``thyme data
review``) and the RL annotation round trip need (create a project with a labeling config, import
tasks, list tasks, submit an annotation, export, delete a project).

Label Studio is an outside server, so it is untrusted like any other (threat model, "Hostile or
broken servers"): every call goes through the project's one HTTP client (:func:`thyme.http.fetch_sync`,
a whole-request deadline and a response size cap), replies are parsed by the bounded JSON reader,
and a reply that is not what the API documents raises :class:`LabelStudioError` naming the call.

Authentication (measured on 1.23.2, ``docs/label-studio.md``): a *legacy token* (40 hex
characters, ``Authorization: Token T``; legacy tokens are off by default in 1.23 and an admin
turns them on per organisation) or a *personal access token* (a JWT refresh token, exchanged at
``POST /api/token/refresh/`` for a short-lived access token sent as ``Authorization: Bearer``;
what the Label Studio SDK does). :class:`LabelStudio` tells them apart by their shape (a JWT has
three dot-separated parts) and refreshes the access token once when the server answers 401.

Endpoints used (Label Studio 1.23 API): ``GET /health``, ``POST /api/projects``, ``DELETE
/api/projects/{id}``, ``POST /api/projects/{id}/import``, ``GET /api/tasks?project={id}``
(paged), ``POST /api/tasks/{id}/annotations``, ``GET /api/projects/{id}/export?exportType=JSON``,
``POST /api/storages/localfiles/``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable

from ..errors import ThymeError
from ..http import HTTPFailure, HTTPLimits, excerpt, fetch_sync
from ..jsonl import loads_bounded

#: The environment variables the ``thyme`` commands read the server and its token from (the
#: names the Label Studio SDK uses).
URL_ENV = "LABEL_STUDIO_URL"
TOKEN_ENV = "LABEL_STUDIO_API_KEY"

_JWT_RE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")


class LabelStudioError(ThymeError):
    """A Label Studio call failed: not reachable, an HTTP error status, or a reply not as documented.

    Attributes:
        status: the HTTP status (``None`` when no answer came).
    """

    def __init__(self, message: str, hint: str | None = None, *, status: int | None = None):
        super().__init__(message, hint)
        self.status = status


@dataclass(frozen=True)
class LabelStudioLimits:
    """What one call to Label Studio may take.

    Attributes:
        deadline_s: seconds for one request (an import of many tasks with inline images is the slowest).
        max_response_bytes: largest reply read (an export holds every task's data, images
            included when they are data URLs).
        import_batch: tasks sent per import request.
        import_batch_bytes: most JSON bytes sent per import request (Label Studio refuses a
            request body over its ``DATA_UPLOAD_MAX_MEMORY_SIZE``, 250 MiB by default).
    """

    deadline_s: float = 300.0
    max_response_bytes: int = 2 << 30
    import_batch: int = 100
    import_batch_bytes: int = 64 << 20


class LabelStudio:
    """One Label Studio server.

    Args:
        url: the server's base URL (``http://127.0.0.1:8080``; a trailing ``/`` is dropped).
        token: a legacy API token or a personal access token (module docstring).
        limits: per-call limits.
        proxy: the proxy policy of :func:`thyme.http.resolve_proxy` (loopback always goes direct).

    Raises:
        LabelStudioError: (from every method) the server cannot be reached, answers an error
            status (message names the call, the status and the start of the reply), or a reply
            not shaped as documented.
    """

    def __init__(self, url: str, token: str, *, limits: LabelStudioLimits | None = None, proxy: str = "env"):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise LabelStudioError(
                f"Label Studio URL must start with http:// or https://, got {url!r}", f"e.g. http://127.0.0.1:8080 (or set {URL_ENV})"
            )
        if not token:
            raise LabelStudioError(
                "no Label Studio API token given", f"set {TOKEN_ENV} to a token from the server's Account & Settings page"
            )
        self.url = url.rstrip("/")
        self.token = token
        self.limits = limits or LabelStudioLimits()
        self._http = HTTPLimits(deadline_s=self.limits.deadline_s, max_response_bytes=self.limits.max_response_bytes, proxy=proxy)
        self._access: str | None = None

    # ------------------------------------------------------------------ plumbing

    @property
    def uses_personal_token(self) -> bool:
        """Whether the token is a personal access token (a JWT) rather than a legacy token."""
        return bool(_JWT_RE.match(self.token))

    def _auth(self, refresh: bool = False) -> dict[str, str]:
        if not self.uses_personal_token:
            return {"Authorization": f"Token {self.token}"}
        if self._access is None or refresh:
            reply = self._send("POST", "/api/token/refresh/", {"refresh": self.token}, headers={})
            access = reply.get("access") if isinstance(reply, dict) else None
            if not isinstance(access, str) or not access:
                raise LabelStudioError(
                    f"{self.url}/api/token/refresh/ gave no access token", "is the personal access token valid and not revoked?"
                )
            self._access = access
        return {"Authorization": f"Bearer {self._access}"}

    def _send(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        raw: bool = False,
        content: bytes | None = None,
    ) -> Any:
        url = self.url + path
        h = {"Accept": "application/json"}
        if content is not None:
            h["Content-Type"] = "application/json"
        h.update(self._auth() if headers is None else headers)
        try:
            r = fetch_sync(method, url, self._http, json_body=body, content=content, headers=h)
            if r.status == 401 and headers is None and self.uses_personal_token:  # the access token expired
                h.update(self._auth(refresh=True))
                r = fetch_sync(method, url, self._http, json_body=body, content=content, headers=h)
        except HTTPFailure as e:
            raise LabelStudioError(
                f"Label Studio {method} {path}: {e.message}", e.hint or f"is Label Studio running at {self.url}?"
            ) from None
        if r.status >= 400:
            hint = None
            if r.status == 401:
                hint = (
                    f"check {TOKEN_ENV}; Label Studio 1.23 disables legacy tokens by default: use a personal access token, "
                    "or have an admin enable legacy tokens for the organisation"
                )
            raise LabelStudioError(f"Label Studio {method} {path} answered HTTP {r.status}: {excerpt(r.text, 500)}", hint, status=r.status)
        if raw:
            return r.body
        if not r.body.strip():
            return None
        try:
            return loads_bounded(r.body, max_bytes=max(1, len(r.body)), what=f"Label Studio reply to {method} {path}")
        except ValueError as e:
            raise LabelStudioError(f"Label Studio {method} {path}: the reply is not usable JSON ({e})", status=r.status) from None

    @staticmethod
    def _id(obj: Any, what: str) -> int:
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), int) or isinstance(obj.get("id"), bool):
            raise LabelStudioError(f"Label Studio's reply to {what} has no integer 'id': {excerpt(json.dumps(obj, default=str), 300)}")
        return obj["id"]

    # ------------------------------------------------------------------ calls

    def health(self) -> bool:
        """Whether ``GET /health`` answers ``{"status": "UP"}`` (no token needed; never raises)."""
        try:
            r = fetch_sync("GET", self.url + "/health", HTTPLimits(deadline_s=10, max_response_bytes=1 << 16, proxy=self._http.proxy))
            return r.status == 200 and isinstance(r.json(), dict) and r.json().get("status") == "UP"
        except (HTTPFailure, ValueError):
            return False

    def create_project(self, title: str, label_config: str, **fields: Any) -> dict[str, Any]:
        """``POST /api/projects``: a project with ``label_config`` (XML); ``title`` of 3 to 50 characters.

        Returns:
            The project as the server returns it (``id`` an int).
        """
        reply = self._send("POST", "/api/projects", {"title": title, "label_config": label_config, **fields})
        self._id(reply, "POST /api/projects")
        return reply

    def delete_project(self, project_id: int) -> None:
        """``DELETE /api/projects/{id}`` (tasks and annotations go with it)."""
        self._send("DELETE", f"/api/projects/{int(project_id)}")

    def import_tasks(self, project_id: int, tasks: Iterable[dict[str, Any]]) -> int:
        """``POST /api/projects/{id}/import`` in batches of at most ``limits.import_batch`` tasks
        and ``limits.import_batch_bytes`` bytes.

        Args:
            tasks: Label Studio tasks (``{"data": {...}}``, optionally ``annotations``).

        Returns:
            The number of tasks the server reports as imported.

        Raises:
            LabelStudioError: as every call; also a single task over ``import_batch_bytes``.
        """
        n = 0
        batch: list[bytes] = []
        size = 0

        def send() -> int:
            body = b"[" + b",".join(batch) + b"]"
            reply = self._send("POST", f"/api/projects/{int(project_id)}/import", content=body)
            count = reply.get("task_count") if isinstance(reply, dict) else None
            return count if isinstance(count, int) and not isinstance(count, bool) else len(batch)

        for i, task in enumerate(tasks):
            raw = json.dumps(task, ensure_ascii=False).encode("utf-8")
            if len(raw) > self.limits.import_batch_bytes:
                raise LabelStudioError(
                    f"task {i} is {len(raw) / 2**20:.1f} MiB, over the {self.limits.import_batch_bytes / 2**20:g} MiB a request may carry",
                    "export with --image-mode local-files (images served by Label Studio) for large images",
                )
            if batch and (len(batch) >= max(1, self.limits.import_batch) or size + len(raw) > self.limits.import_batch_bytes):
                n += send()
                batch, size = [], 0
            batch.append(raw)
            size += len(raw) + 1
        if batch:
            n += send()
        return n

    def list_tasks(self, project_id: int, *, page_size: int = 100) -> list[dict[str, Any]]:
        """Every task of a project (``GET /api/tasks?project={id}``, page by page).

        Returns:
            The tasks (``id``, ``data``, ...), in the server's order.
        """
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            reply = self._send("GET", f"/api/tasks?project={int(project_id)}&page={page}&page_size={int(page_size)}")
            items = reply.get("tasks", reply.get("results")) if isinstance(reply, dict) else reply
            if not isinstance(items, list):
                raise LabelStudioError(
                    f"Label Studio's task list of project {project_id} is not a list of tasks: {excerpt(str(reply), 300)}"
                )
            for t in items:
                self._id(t, "GET /api/tasks")
            out.extend(items)
            total = reply.get("total") if isinstance(reply, dict) else None
            if not items or not isinstance(reply, dict) or (isinstance(total, int) and len(out) >= total) or len(items) < page_size:
                return out
            page += 1

    def create_annotation(self, task_id: int, result: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        """``POST /api/tasks/{id}/annotations``: one annotation by the token's user.

        Args:
            result: Label Studio result items (``from_name``, ``to_name``, ``type``, ``value``).
        """
        reply = self._send("POST", f"/api/tasks/{int(task_id)}/annotations", {"result": result, **fields})
        self._id(reply, f"POST /api/tasks/{task_id}/annotations")
        return reply

    def export_project(self, project_id: int) -> bytes:
        """``GET /api/projects/{id}/export?exportType=JSON``: the raw export (a JSON list of tasks
        with their ``annotations``), for :func:`thyme.data.review.read_export` and the like."""
        return self._send("GET", f"/api/projects/{int(project_id)}/export?exportType=JSON", raw=True)

    def add_local_storage(self, project_id: int, path: str, title: str = "thyme images") -> dict[str, Any]:
        """``POST /api/storages/localfiles/``: a local-files source storage of the project at
        ``path`` (an absolute folder on the server's machine, strictly inside its
        ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``). Label Studio serves a ``/data/local-files/``
        URL only to users of a project with such a storage above the file; nothing is synced.
        """
        reply = self._send(
            "POST",
            "/api/storages/localfiles/",
            {"project": int(project_id), "path": str(path), "title": title, "use_blob_urls": True, "regex_filter": ""},
        )
        self._id(reply, "POST /api/storages/localfiles/")
        return reply

    def download(self, path: str) -> bytes:
        """``GET`` a server-relative path with the token (e.g. a task's ``/data/local-files/?d=...``
        image URL), within the size cap.

        Raises:
            LabelStudioError: not a server-relative path (``/...``), or as every call.
        """
        if not isinstance(path, str) or not path.startswith("/") or path.startswith("//"):
            raise LabelStudioError(f"not a path on the Label Studio server: {str(path)[:200]!r}")
        return self._send("GET", path, raw=True)


# --------------------------------------------------------------------------- result items


def xml_attr(s: str) -> str:
    """``s`` escaped for a double-quoted attribute of a labeling config (XML)."""
    return s.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def choices_result(from_name: str, to_name: str, *choices: str) -> dict[str, Any]:
    """A ``Choices`` result item (what an annotator's click on a choice records)."""
    return {"from_name": from_name, "to_name": to_name, "type": "choices", "value": {"choices": list(choices)}}


def text_result(from_name: str, to_name: str, text: str) -> dict[str, Any]:
    """A ``TextArea`` result item."""
    return {"from_name": from_name, "to_name": to_name, "type": "textarea", "value": {"text": [text]}}


def rectangle_result(
    from_name: str, to_name: str, box: tuple[float, float, float, float], size: tuple[int, int], label: str
) -> dict[str, Any]:
    """A ``RectangleLabels`` result item for a box in pixels.

    Args:
        box: ``(x1, y1, x2, y2)`` in pixels of the original image.
        size: the image's ``(width, height)`` in pixels.

    Returns:
        The item, its ``x``/``y``/``width``/``height`` in percent of the image (Label Studio's unit),
        with ``original_width``/``original_height``.
    """
    (x1, y1, x2, y2), (w, h) = box, size
    value = {
        "x": 100.0 * x1 / w,
        "y": 100.0 * y1 / h,
        "width": 100.0 * (x2 - x1) / w,
        "height": 100.0 * (y2 - y1) / h,
        "rotation": 0,
        "rectanglelabels": [label],
    }
    return {
        "from_name": from_name,
        "to_name": to_name,
        "type": "rectanglelabels",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": value,
    }
