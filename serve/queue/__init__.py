"""The review queue between the engine and the reviewers, addressed by URL.

    queue = open_queue("sqlite:///review.db")          # embedded, one file, several processes
    queue = open_queue("redis://localhost:6379/0")     # production, shared by replicas
    queue.enqueue(decisions, predictions)              # idempotent on the prediction id
    items = queue.claim("general", "alice", n=10, lease=300)
    queue.submit([{"id": "p-17", "reviewer": "alice", "tier": "general", "action": "confirm"}])

Semantics (the same on every backend) are in :mod:`.base`; the item columns in :mod:`.items`.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from .base import ACTIONS, VERDICT_SCHEMA, QueueError, QueueOptions, ReviewQueue
from .items import ItemError, review_items


def open_queue(url: str, options: QueueOptions | None = None) -> ReviewQueue:
    """The queue at ``url``: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``
    or ``redis://[:password@]host:port/db`` (``rediss://`` for TLS)."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
        if not path:
            raise QueueError(f"queue url: expected sqlite:///path/to/file.db, found {url!r}")
        from .sqlite import SqliteQueue

        return SqliteQueue(Path(path), options)
    if parts.scheme in ("redis", "rediss"):
        from .redis import RedisQueue

        return RedisQueue(url, options)
    raise QueueError(f"queue url: expected a sqlite:/// or redis:// url, found {url!r}")


__all__ = ["ACTIONS", "ItemError", "QueueError", "QueueOptions", "ReviewQueue", "VERDICT_SCHEMA", "open_queue",
           "review_items"]
