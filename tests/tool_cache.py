"""Outside tools the tests build once and keep under the user's cache (``~/.cache/hitl-triage``,
or ``$XDG_CACHE_HOME/hitl-triage``): Label Studio's and tritonclient's virtual environments (each
pins packages of its own, so neither may live in the project's) and the Node.js client's npm
packages.

Each is built under an flock, so one test session builds it while any other waits, and is reused
while its ``.installed`` marker is there; a build that fails leaves nothing behind. Standard
library only: ``python tests/labelstudio_server.py`` uses it before the project is installed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable


class Unavailable(RuntimeError):
    """A tool that cannot be built here (the message says why: no network, most often)."""


def cache_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hitl-triage"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def built_once(name: str, build: Callable[[Path], str]) -> Path:
    """``cache_dir() / name``, made by ``build(directory)`` (which returns the marker's text) when
    it is not there yet."""
    home = cache_dir() / name
    with open(cache_dir() / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time, whichever test session asks
        if not (home / ".installed").exists():
            shutil.rmtree(home, ignore_errors=True)
            try:
                note = build(home)
            except BaseException:
                shutil.rmtree(home, ignore_errors=True)
                raise
            (home / ".installed").write_text(note)
    return home


def venv_with(name: str, requirement: str, timeout_s: float) -> Path:
    """The python of a virtual environment ``name`` holding ``requirement`` (a pip requirement),
    built when missing; Unavailable when pip cannot install it in ``timeout_s`` seconds a step."""

    def build(venv: Path) -> str:
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q", requirement]]
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise Unavailable(f"{requirement} could not be installed in {timeout_s:.0f} s") from None
            if done.returncode != 0:
                tail = [line for line in (done.stderr or done.stdout).strip().splitlines() if not line.startswith("WARNING")][-2:]
                raise Unavailable(f"{requirement} could not be installed in a virtual environment (no network?): "
                                  f"{' | '.join(tail)}")
        return requirement + "\n"

    return built_once(name, build) / "bin" / "python"
