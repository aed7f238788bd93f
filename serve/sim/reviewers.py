"""Simulated reviewers: people who work a review queue by tier and answer from the simulator's truth.

    truth = truth_labels(truth_table, gold_labels)            # id -> true class (-1: out of scope)
    crew = [SimReviewer("ann", "general", error_rate=0.02),
            SimReviewer("bob", "general", error_rate=0.02, error_rate_end=0.4, ramp_verdicts=400)]
    counts = work_queue(queue, crew, truth)                  # claim, answer, submit until empty

A reviewer answers an item right with probability ``1 - error_rate`` (its rate after ``n`` verdicts:
:meth:`SimReviewer.error_at`): a known class is confirmed when the model predicted it and
corrected to it otherwise; an out-of-distribution row (label -1 in the truth) is ``out_of_scope``.
A wrong answer is a class drawn uniformly among the wrong ones (for an out-of-scope row: any
class), so ``error_rate = (C - 1) / C`` is a reviewer who answers at random. ``escalate_share``
of the answers below the top tier are ``escalate`` instead (a reviewer unsure of an item).

Blind items (the queue withholds the prediction) are answered with a label only, like Label
Studio's sink (:mod:`hitl_triage.serve.queue.labelstudio`): the label is submitted as ``confirm``
and, when the queue refuses that because the model predicted another class, as ``correct``.

Reviewers see only what ``claim`` returns (never the truth of an item before answering it, never
whether it is a gold item); the truth mapping plays the world. Deterministic for a given seed,
queue content and order of calls.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

__all__ = ["SimReviewer", "truth_labels", "work_queue"]


@dataclasses.dataclass
class SimReviewer:
    """One simulated reviewer of ``tier``.

    ``error_rate``: probability of a wrong answer at the start; ``error_rate_end`` (None: the
    same): the rate reached after ``ramp_verdicts`` verdicts, linearly (a reviewer who drifts);
    ``escalate_share``: share of answers that send the item one tier up (never at the top tier);
    ``seed``: of this reviewer's random answers."""

    name: str
    tier: str
    error_rate: float = 0.0
    error_rate_end: float | None = None
    ramp_verdicts: int = 1000
    escalate_share: float = 0.0
    seed: int = 0
    answered: int = 0
    """Verdicts given so far (what :meth:`error_at` is evaluated at)."""

    def __post_init__(self) -> None:
        for field in ("error_rate", "escalate_share") + (("error_rate_end",) if self.error_rate_end is not None else ()):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"SimReviewer.{field}: expected a probability in [0, 1], found {value!r}")
        if not (isinstance(self.ramp_verdicts, int) and self.ramp_verdicts >= 1):
            raise ValueError(f"SimReviewer.ramp_verdicts: expected an integer >= 1, found {self.ramp_verdicts!r}")
        # one stream per reviewer: its answers do not depend on who else works the queue
        self._rng = np.random.default_rng([self.seed, *self.name.encode()])

    def error_at(self, verdicts: int) -> float:
        """Error rate after ``verdicts`` verdicts."""
        if self.error_rate_end is None:
            return self.error_rate
        frac = min(1.0, verdicts / self.ramp_verdicts)
        return self.error_rate + frac * (self.error_rate_end - self.error_rate)

    def answer(self, items: pa.Table, truth: Mapping[str, int], *, top_tier: bool = False) -> list[dict]:
        """One verdict dict per claimed item (``id``, ``label``, ``reviewer``, ``tier``,
        ``action``; ``action`` None for a blind item: confirm or correct, whichever the queue
        takes). KeyError naming the id for an item the truth does not know."""
        out = []
        ids = items.column("id").to_pylist()
        predicted = items.column("predicted_class").to_pylist()
        classes = items.column("classes").to_pylist()
        blind = items.column("blind").to_pylist() if "blind" in items.schema.names else [False] * len(ids)
        for item_id, pred, c, hidden in zip(ids, predicted, classes, blind):
            if item_id not in truth:
                raise KeyError(f"truth: expected a label for item {item_id!r}, found none")
            y = int(truth[item_id])
            wrong = self._rng.random() < self.error_at(self.answered)
            self.answered += 1
            verdict = {"id": item_id, "reviewer": self.name, "tier": self.tier}
            if not top_tier and self.escalate_share > 0 and self._rng.random() < self.escalate_share:
                out.append({**verdict, "label": None, "action": "escalate"})
                continue
            if y < 0 and not wrong:
                out.append({**verdict, "label": None, "action": "out_of_scope"})
                continue
            label = y
            if wrong:  # a class other than the truth, uniformly
                label = int(self._rng.integers(c)) if y < 0 else int((y + 1 + self._rng.integers(c - 1)) % c)
            if hidden or pred is None:
                out.append({**verdict, "label": label, "action": None})
            else:
                out.append({**verdict, "label": label, "action": "confirm" if label == pred else "correct"})
        return out


def truth_labels(*tables: pa.Table | Mapping[str, int]) -> dict[str, int]:
    """id -> true class from tables with ``id`` and ``label`` columns (the simulator's truth
    file, -1 for out-of-distribution rows; a calibration file) or mappings, later ones winning."""
    out: dict[str, int] = {}
    for table in tables:
        if isinstance(table, Mapping):
            out.update({str(k): int(v) for k, v in table.items()})
            continue
        for name in ("id", "label"):
            if name not in table.schema.names:
                raise ValueError(f"truth: expected an {name!r} column, found columns {table.schema.names}")
        out.update(zip(table.column("id").cast(pa.string()).to_pylist(), table.column("label").to_pylist()))
    return out


def work_queue(queue, reviewers: Sequence[SimReviewer], truth: Mapping[str, int], *, batch: int = 64,
               lease: float = 300.0, max_rounds: int = 100_000, ts: float | None = None,
               limit: int | None = None) -> dict[str, int]:
    """Let ``reviewers`` work ``queue`` until no reviewer finds an item it may claim: each in turn
    claims up to ``batch`` items of its tier, answers and submits them. Returns the queue's
    summed ``submit`` counts plus ``claimed``. Items moved to a tier nobody works stay there.
    ``ts``: the time every verdict carries (seconds since the epoch; None: the time it is stored);
    ``limit``: stop once about this many items were claimed (None: until the queue runs dry)."""
    totals = {"claimed": 0, "stored": 0, "duplicates": 0, "done": 0, "moved": 0}
    top = queue.options.tiers[-1]
    for _ in range(max_rounds):
        progress = False
        for reviewer in reviewers:
            if limit is not None and totals["claimed"] >= limit:
                return totals
            items = queue.claim(reviewer.tier, reviewer.name, n=batch, lease=lease)
            if items.num_rows == 0:
                continue
            progress = True
            totals["claimed"] += items.num_rows
            answers = reviewer.answer(items, truth, top_tier=reviewer.tier == top)
            if ts is not None:
                answers = [{**a, "ts": float(ts)} for a in answers]
            shown = [a for a in answers if a["action"] is not None]
            if shown:
                _add(totals, queue.submit(shown))
            blind = [a for a in answers if a["action"] is None]
            if blind:
                _add(totals, _submit_blind(queue, blind))
        if not progress:
            return totals
    raise RuntimeError(f"work_queue: expected the queue to run dry within {max_rounds} rounds, found items left")


def _submit_blind(queue, answers: list[dict]) -> dict:
    """Blind answers: each a confirm when the queue's predicted class is its label, else a
    correct. The batch goes as confirms; a refused row (the queue names it, and stores nothing of
    a refused call) becomes a correct and the batch goes again."""
    from hitl_triage.serve.queue import QueueError

    batch = [{**a, "action": "confirm"} for a in answers]
    for _ in range(len(batch) + 1):
        try:
            return queue.submit(batch)
        except QueueError as error:
            found = re.match(r"verdicts row (\d+) ", str(error))
            if found is None or "use action correct" not in str(error) or batch[int(found[1])]["action"] != "confirm":
                raise
            batch[int(found[1])]["action"] = "correct"
    raise AssertionError("unreachable: every row can turn from confirm to correct once")


def _add(totals: dict[str, int], counts: dict) -> None:
    for key, value in counts.items():
        totals[key] = totals.get(key, 0) + int(value)
