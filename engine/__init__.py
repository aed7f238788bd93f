"""Triage engine: batches of predictions in, decision columns out (no network, no files beyond
the profile). The names most callers need:

- :class:`TriageConfig` — the ``triage.toml`` configuration, every key defaulted;
- :class:`Profile` — fit (``Profile.fit``), save and load a versioned profile directory;
- :class:`TriageEngine` — ``TriageEngine(profile).triage(batch)`` -> ``pyarrow.RecordBatch``;
- :class:`TriageSummary` — mergeable counts over decision batches.
"""

from .config import TriageConfig
from .engine import DECISION_SCHEMA, TriageEngine
from .monitoring import TriageSummary
from .policy import Reason
from .profile import Profile, ProfileError

__all__ = ["DECISION_SCHEMA", "Profile", "ProfileError", "Reason", "TriageConfig", "TriageEngine", "TriageSummary"]
