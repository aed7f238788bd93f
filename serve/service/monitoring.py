"""A server's monitoring: the decision statistics of every engine batch it decides, joined with
the verdicts its review queue holds, computed into the figures of
:mod:`hitl_triage.engine.monitoring_report` (what ``Stats`` returns as ``monitoring_json``, what
the metrics' gauges show, what ``triage report`` draws).

The decision statistics are this process's (with ``--workers N``, each worker's own share of the
traffic; :meth:`MonitorStats.merge` adds them up where one wants the whole); the verdicts are the
queue's, shared by every replica. Figures are recomputed only when a new batch was decided or a
verdict stored since the last time, so an idle server pays nothing.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
import time

import pyarrow as pa

from hitl_triage.engine.monitoring_report import AlertConfig, compute
from hitl_triage.engine.monitoring_stats import MonitorStats, StatsConfig

logger = logging.getLogger(__name__)


def stats_config(profile, window_s: float = 3600.0) -> StatsConfig:
    """Binning for a profile: its classes, its anomaly threshold as the OOD scale."""
    ood = float(profile.thresholds.ood)
    return StatsConfig(classes=int(profile.classes), window_s=window_s,
                       ood_threshold=ood if ood > 0 and ood == ood and ood != float("inf") else 1.0)


class ServiceMonitor:
    """``decided(decisions)`` per engine batch (the hot path: a few bincounts), ``figures()``
    when someone looks."""

    def __init__(self, profile, queue, *, window_s: float = 3600.0, span: int = 24, alerts: AlertConfig | None = None):
        self.stats = MonitorStats(stats_config(profile, window_s))
        self.queue = queue
        self.alerts = alerts or AlertConfig()
        self.span = span  # rates over the latest `span` windows (a day of hours by default)
        self._lock = threading.Lock()
        self._batches = 0
        self._cached: tuple[tuple, dict] | None = None
        self._computed_at = 0.0

    def decided(self, decisions: pa.RecordBatch, now: float | None = None) -> None:
        with self._lock:
            self.stats.update(decisions, time.time() if now is None else now)
            self._batches += 1

    def snapshot(self) -> MonitorStats:
        """The decision statistics so far joined with every verdict the queue holds."""
        with self._lock:
            stats = MonitorStats(self.stats.config, copy.copy(self.stats.decisions), reference=self.stats.reference)
        if self.queue is not None:
            stats.update_verdicts(self.queue.verdicts())
        return stats

    def figures(self, *, max_age_s: float = 0.0) -> dict:
        """:func:`~hitl_triage.engine.monitoring_report.compute` of :meth:`snapshot`, cached
        until a batch is decided or a verdict stored, and, with ``max_age_s``, for that long
        whatever happens (the metrics refresh: reading a large queue's verdicts takes a while)."""
        now = time.monotonic()
        if self._cached is not None and now - self._computed_at < max_age_s:
            return self._cached[1]
        verdicts = sum(self.queue.stats().get("verdicts", {}).values()) if self.queue is not None else 0
        key = (self._batches, verdicts)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        figures = compute(self.snapshot(), self.alerts, span=self.span)
        self._cached, self._computed_at = (key, figures), now
        return figures


def figures_json(figures: dict) -> str:
    """The figures as strict JSON (NaN, an estimate with no sample yet, as null)."""
    return json.dumps(_strict(figures), separators=(",", ":"))


def _strict(x):
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {str(k): _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    if hasattr(x, "item"):  # numpy scalars
        return _strict(x.item())
    return x


def attach_gold(queue, engine, monitor: ServiceMonitor | None = None) -> None:
    """Give ``queue`` its gold pool when its options name one (``gold_pool``: a labelled Parquet
    file such as the calibration file, decided here by ``engine``; used when ``gold_share`` > 0).
    The same decisions are ``monitor``'s drift reference: the traffic the profile was fitted on."""
    options = getattr(queue, "options", None)
    if options is None or not options.gold_pool:
        if options is not None and options.gold_share > 0:
            raise ValueError("queue.gold_pool: expected a labelled Parquet file (a calibration file) with gold_share "
                             "> 0, found none")
        return
    import pyarrow.parquet as pq

    from hitl_triage.serve.queue.gold import GoldPool

    table = pq.read_table(options.gold_pool)
    decisions = pa.Table.from_batches([engine.triage(b) for b in table.to_batches()])
    if monitor is not None:
        monitor.stats.set_reference(decisions)
    if options.gold_share <= 0:
        return
    queue.gold = GoldPool(decisions, table)
    logger.info("gold items: %d labelled rows from %s, %.1f%% of each tier", queue.gold.decisions.num_rows,
                options.gold_pool, 100 * options.gold_share)
