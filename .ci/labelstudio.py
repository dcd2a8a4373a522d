#!/usr/bin/env python3
"""Run a command against a real, throw-away Label Studio (``make test-labelstudio``).

Starts ``label-studio start`` from its own virtualenv on loopback (a free port), with its default
SQLite store in a scratch folder, waits for ``GET /health``, prepares two annotators, runs the
command with the server in its environment, stops the server and removes the folder:

- ``THYME_LABEL_STUDIO_URL``: the server's URL;
- ``THYME_LABEL_STUDIO_TOKEN``: the first annotator's (the admin's) legacy API token;
- ``THYME_LABEL_STUDIO_TOKEN_2``: the second annotator's personal access token (a JWT);
- ``THYME_LABEL_STUDIO_FILES_ROOT``: an empty folder the server serves as local files
  (``/data/local-files/?d=<path inside it>``; ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED``).

Two annotators: Label Studio's API creates users (``POST /api/users/``) but hands a token only to
the user themself after a browser login, and 1.23 disables legacy tokens by default. So this
script, which owns the server, does both through Label Studio's own Django models (as an admin's
settings page and a sign-up would): legacy tokens on for the organisation, a second user in it
with a personal access token. The test then uses both kinds of token.

Usage: labelstudio.py --label-studio PATH/TO/label-studio [--timeout 300] -- COMMAND...
Standard library only (it runs under the main venv's Python).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PREPARE = r"""
import os, sys, json
import label_studio
sys.path.insert(0, os.path.dirname(label_studio.__file__))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "core.settings.label_studio")
import django
django.setup()
from organizations.models import Organization
from users.models import User
from jwt_auth.models import LSAPIToken
org = Organization.objects.first()
jwt = org.jwt
jwt.legacy_api_tokens_enabled = True
jwt.save()
email, password = sys.argv[1], sys.argv[2]
user = User.objects.create_user(email=email, password=password, username=email.split("@")[0])
org.add_user(user)
user.active_organization = org
user.save()
print(json.dumps({"user_id": user.id, "token": LSAPIToken.for_user(user).get_full_jwt()}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return json.loads(r.read(1 << 16)).get("status") == "UP"
    except Exception:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label-studio", required=True, help="the label-studio executable of its virtualenv")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for /health")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("give the command to run after --")
    exe = Path(a.label_studio)
    ls_python = exe.parent / "python"
    data = Path(tempfile.mkdtemp(prefix="thyme-labelstudio-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    token = secrets.token_hex(20)
    files = data / "files"
    files.mkdir()
    env = dict(
        os.environ,
        # one signing key for the server and the preparing process: unset, each Label Studio
        # process that finds none in DATA/.env generates and appends its own, and when the server's
        # start-up races itself the second annotator's JWT is signed with a key the server does not
        # use ("Token is invalid" on /api/token/refresh/, seen in one CI run of three)
        SECRET_KEY=secrets.token_urlsafe(50),
        LABEL_STUDIO_BASE_DATA_DIR=str(data),
        LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
        SENTRY_DSN="",
        LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
        LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(files),
    )
    if not env.get("HOST", "http://").startswith(("http://", "https://")):
        env.pop("HOST")
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(k, None)
    log = open(data / "server.log", "wb")
    t0 = time.monotonic()
    server = subprocess.Popen(
        [
            str(exe),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--port",
            str(port),
            "--username",
            "reviewer1@thyme.local",
            "--password",
            secrets.token_hex(12),
            "--user-token",
            token,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    rc = 1
    try:
        while not healthy(url):
            if server.poll() is not None:
                raise SystemExit(
                    f"label-studio exited with {server.returncode} before /health answered; log:\n"
                    + (data / "server.log").read_text(errors="replace")[-4000:]
                )
            if time.monotonic() - t0 > a.timeout:
                raise SystemExit(
                    f"label-studio did not answer /health within {a.timeout:g} s; log:\n"
                    + (data / "server.log").read_text(errors="replace")[-4000:]
                )
            time.sleep(1)
        started = time.monotonic() - t0
        prep = subprocess.run(
            [str(ls_python), "-c", PREPARE, "reviewer2@thyme.local", secrets.token_hex(12)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if prep.returncode != 0:
            raise SystemExit(f"could not prepare the annotators:\n{prep.stderr[-4000:]}")
        second = json.loads(prep.stdout.strip().splitlines()[-1])
        print(f"label-studio: up at {url} after {started:.1f} s (data in {data})", file=sys.stderr, flush=True)
        t1 = time.monotonic()
        rc = subprocess.call(
            cmd,
            env=dict(
                os.environ,
                THYME_LABEL_STUDIO_URL=url,
                THYME_LABEL_STUDIO_TOKEN=token,
                THYME_LABEL_STUDIO_TOKEN_2=second["token"],
                THYME_LABEL_STUDIO_FILES_ROOT=str(files),
            ),
        )
        print(f"label-studio: the command took {time.monotonic() - t1:.1f} s (exit {rc})", file=sys.stderr, flush=True)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()
        if rc != 0 and (data / "server.log").exists():
            print("label-studio log (tail):\n" + (data / "server.log").read_text(errors="replace")[-3000:], file=sys.stderr)
        shutil.rmtree(data, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
