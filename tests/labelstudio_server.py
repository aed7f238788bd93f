"""A real Label Studio server for the tests.

Label Studio pins its own numpy and pyarrow, so it lives in a virtual environment of its own,
never the project's: built once (``python -m venv`` + ``pip install label-studio==VERSION``,
about 2 minutes and 1 GB) under ``~/.cache/hitl-triage/label-studio-VERSION`` and reused while
its ``.installed`` marker is there; ``HITL_TRIAGE_LABEL_STUDIO_VENV`` names a ready one instead.
``python tests/labelstudio_server.py`` builds it alone (standard library only, so CI can start
it in the background before the project is installed; a test that needs it meanwhile waits on
the same lock). Where it cannot be installed (no network), the tests skip and say why. The server runs on a free loopback port with its data (SQLite) in a temporary
directory; its first user is made from ``LABEL_STUDIO_USERNAME`` / ``LABEL_STUDIO_PASSWORD``, and
each user's personal access token (Label Studio 1.23's default kind; legacy tokens are off)
comes from logging in (or signing up) through its web form, as a person would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tool_cache import Unavailable, venv_with  # noqa: F401  (Unavailable: raised through venv_python)

VERSION = "1.23.2"
INSTALL_TIMEOUT_S = 1200
START_TIMEOUT_S = 300
TIMINGS: dict[str, float] = {}  # measured here: install_s (0 when reused), start_s


def label_studio_python() -> Path:
    """The python of a virtual environment holding Label Studio ``VERSION`` (built when missing),
    or a skip saying why it cannot be had."""
    import pytest

    try:
        return venv_python()
    except Unavailable as why:
        pytest.skip(str(why))


def venv_python() -> Path:
    """The python of the Label Studio virtual environment, built when missing (Unavailable if it cannot be)."""
    ready = os.environ.get("HITL_TRIAGE_LABEL_STUDIO_VENV")
    if ready:
        python = Path(ready) / "bin" / "python"
        if not python.exists():
            raise RuntimeError(f"HITL_TRIAGE_LABEL_STUDIO_VENV={ready}: expected a virtual environment, found no bin/python")
        return python
    started = time.monotonic()
    python = venv_with(f"label-studio-{VERSION}", f"label-studio=={VERSION}", INSTALL_TIMEOUT_S)
    TIMINGS.setdefault("install_s", time.monotonic() - started)  # about 0 when it was there already
    return python


@dataclasses.dataclass
class Server:
    url: str
    admin: str       # the first user's email (an organization owner)
    password: str
    token: str       # the admin's personal access token


@contextlib.contextmanager
def label_studio_server(directory: Path):
    """A Label Studio server on a free loopback port, data in ``directory``; yields a :class:`Server`."""
    from queue_fixtures import free_port

    python = label_studio_python()
    port = free_port()
    admin, password = "admin@example.com", "admin-pass-0123"
    # Label Studio reads many plain names too (HOST, DATABASE_NAME...): none of the caller's may leak in.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DJANGO_", "LABEL_STUDIO_", "HEARTEX_", "POSTGRE_", "REDIS_"))
           and k not in ("HOST", "PORT", "DEBUG", "DATABASE_NAME")}
    env.update(LABEL_STUDIO_BASE_DATA_DIR=str(directory), LABEL_STUDIO_USERNAME=admin,
               LABEL_STUDIO_PASSWORD=password, LOG_LEVEL="WARNING")
    log = open(directory / "label-studio.log", "w")
    started = time.monotonic()
    process = subprocess.Popen(
        [str(python), "-m", "label_studio.server", "start", "--no-browser", "--port", str(port),
         "--internal-host", "127.0.0.1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=directory, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=2) as reply:
                if reply.status == 200:
                    break
            if process.poll() is not None or time.monotonic() - started > START_TIMEOUT_S:
                tail = (directory / "label-studio.log").read_text()[-2000:]
                raise RuntimeError(f"Label Studio did not answer /health on port {port} "
                                   f"(exit {process.poll()}); its log ends:\n{tail}")
            time.sleep(0.5)
        TIMINGS["start_s"] = time.monotonic() - started
        yield Server(url, admin, password, personal_access_token(url, admin, password))
    finally:
        _stop(process)
        log.close()


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it runs in a session of its own), SIGKILL after 20 s."""
    for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait_s)
            return


def personal_access_token(url: str, email: str, password: str, *, signup: bool = False) -> str:
    """A user's personal access token, as a person gets one: log in (or sign up) through the web
    form, then create the token with that session."""
    import requests

    page = "/user/signup/" if signup else "/user/login/"
    session = requests.Session()
    session.get(url + page, timeout=30).raise_for_status()
    reply = session.post(url + page, data={"email": email, "password": password,
                                           "csrfmiddlewaretoken": session.cookies["csrftoken"]},
                         headers={"Referer": url + page}, allow_redirects=False, timeout=30)
    if reply.status_code != 302:
        raise RuntimeError(f"Label Studio {page} for {email}: expected a redirect, found HTTP {reply.status_code}")
    reply = session.post(url + "/api/token/", timeout=30,
                         headers={"X-CSRFToken": session.cookies["csrftoken"], "Referer": url + "/"})
    reply.raise_for_status()
    return reply.json()["token"]


if __name__ == "__main__":
    try:
        print(f"Label Studio {VERSION}: {venv_python()} (install {TIMINGS.get('install_s', 0.0):.0f} s, 0: reused)")
    except Unavailable as why:
        sys.exit(str(why))
