"""The engine a server decides with, and switching to a new profile version without a restart.

A reload builds the new engine (and compiles or loads its kernels) beside the running one, then
swaps it in with one assignment: the batcher reads the engine once per batch, so a batch is
decided by one version, every decision names it, and no call is dropped.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

from hitl_triage.engine.engine import TriageEngine
from hitl_triage.engine.profile import Profile

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

logger = logging.getLogger(__name__)


class EngineHolder:
    def __init__(self, profile_dir: str | Path, *, device: str | None = None):
        self.profile_dir = Path(profile_dir)
        self.device = device
        self.engine = TriageEngine(Profile.load(self.profile_dir), device=device)
        self._reload_lock = threading.Lock()

    @property
    def profile(self) -> Profile:
        return self.engine.profile

    def decide(self, batch):
        return self.engine.triage(batch)

    def reload(self, path: str | Path | None = None) -> tuple[str, str]:
        """Load the profile at ``path`` (default: the server's profile directory, re-read) and
        switch to it between batches. Returns (previous version, new version); the same version
        twice when nothing changed."""
        with self._reload_lock:
            directory = Path(path) if path else self.profile_dir
            profile = Profile.load(directory)
            previous = self.engine.profile.version
            if profile.version == previous:
                return previous, previous
            engine = TriageEngine(profile, device=self.device)
            self.engine = engine
            self.profile_dir = directory
            logger.info("profile reloaded: %s -> %s", previous, profile.version)
            return previous, profile.version

    def changed_on_disk(self) -> bool:
        """Whether the profile directory now holds another version than the one serving."""
        try:
            with open(self.profile_dir / "profile.toml", "rb") as handle:
                version = tomllib.load(handle)["profile"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):  # being rewritten: ask again later
            return False
        return version != self.engine.profile.version
