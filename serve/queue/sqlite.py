"""The embedded review queue: one SQLite file, safe for several processes at once.

Durability: WAL journal with ``synchronous=FULL``, so a transaction that committed survives a
process crash and a power loss (SQLite fsyncs the WAL before COMMIT returns). Every call is one
transaction (``BEGIN IMMEDIATE`` takes the write lock first, so two writers queue up instead of
failing half-way): an enqueued batch, a claim or a verdict batch is stored whole or not at all.

Layout: ``batches`` holds each enqueued batch's items as one Arrow IPC blob (written once, never
changed); ``items`` holds the queue state per prediction id (UNIQUE, which is what makes enqueue
idempotent), with a partial index on the open items of each tier in (priority, arrival) order;
``leases`` the active leases, by expiry; ``verdicts`` every verdict, UNIQUE per (id, tier,
reviewer), which makes a retried submission a no-op.
"""

from __future__ import annotations

import contextlib
import fcntl
import sqlite3
import threading
import time
from pathlib import Path

import pyarrow as pa

from .base import (
    ItemState, QueueError, QueueOptions, ReviewQueue, Verdict, check_claim, check_resubmission, check_verdict, prepare_batch,
    resolve, verdict_rows,
)
from .items import from_ipc
from .payload import PayloadReader, claimed_items, history_line, verdict_table

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (batch INTEGER PRIMARY KEY, ipc BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY,            -- arrival order
    id TEXT NOT NULL UNIQUE,            -- the prediction id: one item per id
    batch INTEGER NOT NULL, row INTEGER NOT NULL,
    tier TEXT NOT NULL, priority REAL NOT NULL,
    needed INTEGER NOT NULL,            -- reviews needed at this tier (2 for overlap items)
    slots INTEGER NOT NULL,             -- reviews still to hand out: needed - verdicts - leases
    predicted INTEGER NOT NULL, classes INTEGER NOT NULL,
    state TEXT NOT NULL,                -- open | done | dead
    deliveries INTEGER NOT NULL DEFAULT 0,
    enqueued_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS open_by_priority ON items (tier, priority DESC, seq) WHERE state = 'open' AND slots > 0;
CREATE TABLE IF NOT EXISTS leases (
    id TEXT NOT NULL, reviewer TEXT NOT NULL, until REAL NOT NULL, PRIMARY KEY (id, reviewer)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS leases_by_expiry ON leases (until);
CREATE TABLE IF NOT EXISTS verdicts (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL, tier TEXT NOT NULL, reviewer TEXT NOT NULL,
    action TEXT NOT NULL, label INTEGER NOT NULL, ts REAL NOT NULL, stored_at REAL NOT NULL,
    UNIQUE (id, tier, reviewer)
);
CREATE INDEX IF NOT EXISTS verdicts_by_time ON verdicts (stored_at);
CREATE TABLE IF NOT EXISTS gold (id TEXT PRIMARY KEY, label INTEGER NOT NULL) WITHOUT ROWID;  -- gold items' answers
"""


class SqliteQueue(ReviewQueue):
    def __init__(self, path: str | Path, options: QueueOptions | None = None, *, busy_timeout_s: float = 60.0):
        self.path = Path(path)
        self.options = (options or QueueOptions()).check()
        try:
            self._open(busy_timeout_s)
        except (sqlite3.Error, OSError) as exc:  # a read-only or full filesystem, a path that is not a database
            raise QueueError(f"queue sqlite:///{self.path}: expected a database file this process can open and "
                             f"write, found {type(exc).__name__}: {exc}") from None
        self._payload = PayloadReader(self._read_batch)

    def _open(self, busy_timeout_s: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit mode (isolation_level=None): transactions are begun explicitly below.
        self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._lock_file = open(self.path.with_name(self.path.name + ".lock"), "a+b")  # noqa: SIM115 - closed in close()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        # The id index and the open-items index outgrow SQLite's default 2 MiB page cache within
        # a few hundred thousand items; past it every insert reads pages back from the OS (1.5x
        # slower enqueues, measured). 64 MiB covers a few million items' indexes.
        self._db.execute("PRAGMA cache_size=-65536")
        with self._write():
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)

    # -- transactions ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self, *, durable: bool = True):
        """One write transaction, holding the database's write lock from its start. A durable
        one is on disk when COMMIT returns (the WAL is fsynced); one that is not (a claim) may be
        forgotten by a power loss, which only offers its items again."""
        with self._lock:
            # Writers of every process queue on an flock of the lock file first: the kernel wakes
            # the next one the moment the last lets go, where SQLite's own busy handler polls with
            # sleeps of up to 100 ms (with eight writers that was most of their time).
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
            try:
                self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def _read_batch(self, batch: int) -> pa.Table:
        with self._lock:
            row = self._db.execute("SELECT ipc FROM batches WHERE batch = ?", (batch,)).fetchone()
        return from_ipc(row[0])

    # -- enqueue -----------------------------------------------------------------------------------

    def enqueue(self, decisions, predictions) -> int:
        return self.enqueue_many([(decisions, predictions)])

    def enqueue_many(self, batches) -> int:
        batches, gold = self._with_gold(batches)
        prepared = [p for p in (prepare_batch(d, r, self.options) for d, r in batches) if p is not None]
        if not prepared:
            return 0
        added = 0
        with self._write() as db:
            db.executemany("INSERT OR IGNORE INTO gold (id, label) VALUES (?, ?)", gold.items())
            for p in prepared:
                batch = db.execute("INSERT INTO batches (ipc) VALUES (?)", (p.blob,)).lastrowid
                before = db.total_changes
                db.executemany(
                    "INSERT OR IGNORE INTO items (id, batch, row, tier, priority, needed, slots, predicted, classes, "
                    "state, enqueued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'open', ?)",
                    zip(p.ids, _repeat(batch), range(len(p.ids)), p.tiers, p.priorities, p.needed, p.needed,
                        p.predicted, p.classes, _repeat(p.enqueued_at)),
                )
                new = db.total_changes - before
                if new == 0:  # every item was already queued: keep no blob for them
                    db.execute("DELETE FROM batches WHERE batch = ?", (batch,))
                added += new
        return added

    # -- claim -------------------------------------------------------------------------------------

    def claim(self, tier: str, reviewer: str, n: int = 1, lease: float = 300.0) -> pa.Table:
        check_claim(tier, reviewer, n, lease, self.options)
        # Leases need no fsync: one lost to a power failure only offers its items again.
        with self._write(durable=False) as db:
            now = time.time()
            self._expire(db, now)
            picked = db.execute(
                "SELECT seq, id, batch, row, deliveries FROM items AS i "
                "WHERE tier = ? AND state = 'open' AND slots > 0 "
                "AND NOT EXISTS (SELECT 1 FROM leases AS l WHERE l.id = i.id AND l.reviewer = ?) "
                "AND NOT EXISTS (SELECT 1 FROM verdicts AS v WHERE v.id = i.id AND v.tier = i.tier AND v.reviewer = ?) "
                "ORDER BY priority DESC, seq LIMIT ?",
                (tier, reviewer, reviewer, n),
            ).fetchall()
            until = now + lease
            db.executemany("INSERT INTO leases (id, reviewer, until) VALUES (?, ?, ?)",
                           [(row[1], reviewer, until) for row in picked])
            db.executemany("UPDATE items SET slots = slots - 1, deliveries = deliveries + 1 WHERE seq = ?",
                           [(row[0],) for row in picked])
            history = self._history(db, [row[1] for row in picked])
        return claimed_items(self._payload, [(row[2], row[3]) for row in picked], tier, [row[4] + 1 for row in picked],
                             until, [history.get(row[1], []) for row in picked], self.options.blind_audit,
                             self.options.blind_share)

    def _expire(self, db: sqlite3.Connection, now: float) -> None:
        """Leases past their time: the slot is offered again; an item that has been delivered
        ``max_deliveries`` times goes to the dead letter list instead."""
        expired = db.execute("SELECT id, reviewer FROM leases WHERE until <= ?", (now,)).fetchall()
        if not expired:
            return
        db.execute("DELETE FROM leases WHERE until <= ?", (now,))
        db.executemany("UPDATE items SET slots = slots + 1 WHERE id = ? AND state = 'open'", [(i,) for i, _ in expired])
        db.executemany("UPDATE items SET state = 'dead' WHERE id = ? AND state = 'open' AND deliveries >= ?",
                       [(i, self.options.max_deliveries) for i, _ in expired])
        db.execute("DELETE FROM leases WHERE id IN (SELECT id FROM items WHERE state = 'dead')")

    def _history(self, db: sqlite3.Connection, ids: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for chunk in _chunks(ids, 500):
            marks = ",".join("?" * len(chunk))
            for item_id, tier, reviewer, action, label in db.execute(
                f"SELECT id, tier, reviewer, action, label FROM verdicts WHERE id IN ({marks}) ORDER BY seq", chunk
            ):
                out.setdefault(item_id, []).append(history_line(tier, reviewer, action, label))
        return out

    # -- verdicts ----------------------------------------------------------------------------------

    def submit(self, verdicts) -> dict:
        rows = verdict_rows(verdicts)
        counts = {"stored": 0, "duplicates": 0, "done": 0, "moved": 0}
        with self._write() as db:
            now = time.time()
            for row, v in enumerate(rows):
                stored = db.execute(
                    "SELECT action, label FROM verdicts WHERE id = ? AND tier = ? AND reviewer = ?", (v.id, v.tier, v.reviewer)
                ).fetchone()
                if stored is not None:
                    check_resubmission(v, stored[0], stored[1], row)
                    counts["duplicates"] += 1
                    continue
                item = self._item_state(db, v.id)
                v = check_verdict(v, item, self.options, row)
                assert item is not None
                db.execute("INSERT INTO verdicts (id, tier, reviewer, action, label, ts, stored_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (v.id, v.tier, v.reviewer, v.action, v.label, v.ts if v.ts == v.ts else now, now))
                db.execute("DELETE FROM leases WHERE id = ? AND reviewer = ?", (v.id, v.reviewer))
                at_tier = [Verdict(v.id, label, reviewer, v.tier, action, ts) for reviewer, action, label, ts in db.execute(
                    "SELECT reviewer, action, label, ts FROM verdicts WHERE id = ? AND tier = ? ORDER BY seq", (v.id, v.tier))]
                outcome = resolve(item, at_tier, self.options)
                counts["stored"] += 1
                if outcome.kind == "open":
                    db.execute("UPDATE items SET slots = needed - ? - (SELECT count(*) FROM leases WHERE id = ?) WHERE id = ?",
                               (sum(x.action != "escalate" for x in at_tier), v.id, v.id))
                    continue
                db.execute("DELETE FROM leases WHERE id = ?", (v.id,))
                if outcome.kind == "done":
                    db.execute("UPDATE items SET state = 'done', slots = 0 WHERE id = ?", (v.id,))
                    counts["done"] += 1
                else:
                    needed = outcome.needed if outcome.needed > 0 else int(self.options.needed([v.id], outcome.tier)[0])
                    db.execute("UPDATE items SET tier = ?, needed = ?, slots = ?, deliveries = 0 WHERE id = ?",
                               (outcome.tier, needed, needed, v.id))
                    counts["moved"] += 1
        return counts

    def _item_state(self, db: sqlite3.Connection, item_id: str) -> ItemState | None:
        row = db.execute("SELECT tier, needed, predicted, classes, state FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            return None
        return ItemState(tier=row[0], needed=row[1], predicted_class=row[2], classes=row[3], done=row[4] != "open")

    # -- reading -----------------------------------------------------------------------------------

    def stats(self) -> dict:
        now = time.time()
        with self._lock:
            db = self._db
            tiers = {t: {"depth": 0, "in_flight": 0, "oldest_age_s": 0.0, "done": 0, "dead": 0} for t in self.options.tiers}
            for tier, state, count, oldest, open_slots in db.execute(
                "SELECT tier, state, count(*), min(enqueued_at), sum(slots > 0) FROM items GROUP BY tier, state"
            ):
                entry = tiers.setdefault(tier, {"depth": 0, "in_flight": 0, "oldest_age_s": 0.0, "done": 0, "dead": 0})
                if state == "open":
                    entry["depth"] = int(open_slots)
                    entry["oldest_age_s"] = max(0.0, now - oldest)
                else:
                    entry[state] = int(count)
            for tier, count in db.execute(
                "SELECT i.tier, count(*) FROM leases AS l JOIN items AS i ON i.id = l.id WHERE l.until > ? GROUP BY i.tier", (now,)
            ):
                tiers[tier]["in_flight"] = int(count)
            actions = dict(db.execute("SELECT action, count(*) FROM verdicts GROUP BY action").fetchall())
        return {"tiers": tiers, "verdicts": {a: int(actions.get(a, 0)) for a in ("confirm", "correct", "escalate", "out_of_scope")}}

    def verdicts(self, since: float | None = None) -> pa.Table:
        with self._lock:
            rows = self._db.execute(
                "SELECT v.id, v.label, v.reviewer, v.tier, v.action, v.ts, v.stored_at, i.batch, i.row "
                "FROM verdicts AS v JOIN items AS i ON i.id = v.id WHERE v.stored_at > ? ORDER BY v.seq",
                (-1.0 if since is None else float(since),),
            ).fetchall()
            gold = dict(self._db.execute("SELECT id, label FROM gold").fetchall())
        return verdict_table(rows, self._payload, self.options, gold)

    def tier_of(self, item_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT tier FROM items WHERE id = ?", (item_id,)).fetchone()
        return None if row is None else row[0]

    def requeue_dead(self) -> int:
        with self._write() as db:
            before = db.total_changes
            db.execute("UPDATE items SET state = 'open', deliveries = 0, "
                       "slots = needed - (SELECT count(*) FROM verdicts AS v WHERE v.id = items.id AND v.tier = items.tier "
                       "AND v.action != 'escalate') WHERE state = 'dead'")
            return db.total_changes - before

    def integrity_check(self) -> str:
        with self._lock:
            return self._db.execute("PRAGMA integrity_check").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._lock_file.close()


def _repeat(value):
    while True:
        yield value


def _chunks(values: list, size: int):
    for i in range(0, len(values), size):
        yield values[i:i + size]

