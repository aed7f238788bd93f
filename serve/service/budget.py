"""The service's hook for online budget control (the rule is hitl_triage.engine.budget_control's).

The batcher thread calls :meth:`BudgetHook.prepare` before each batch (the engine to decide it
with, holding the thresholds of the current step) and :meth:`BudgetHook.observe` after it (the
decisions, with a ``budget_step`` column naming that step, go on; the tracker takes them in and
may step). So thresholds change only between batches, and every decision names the step it was
decided at. A reload (a new engine) starts a new tracker from the new profile's thresholds, step 0.
Rows users reported are not taken in: they are not the traffic the budget is a share of.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import numpy as np
import pyarrow as pa

from hitl_triage.engine.budget_control import BudgetControl

from .config import BudgetControlOptions

logger = logging.getLogger(__name__)


class BudgetHook:
    def __init__(self, options: BudgetControlOptions):
        self.options = options
        self.control: BudgetControl | None = None
        self._engine = None       # the engine the tracker was started for
        self._base = None         # its profile as loaded (the step-0 thresholds)
        self._applied = -1        # the step whose thresholds the engine holds
        self._lock = threading.Lock()  # Stats reads the state from other threads

    def prepare(self, engine):
        """``engine``, holding the current step's thresholds (a new tracker for a new engine).
        The first engine's profile must allow budget control (ConfigError, at the server's start);
        a profile reloaded later that does not (target-risk mode) is served with its own
        thresholds, and the error logged."""
        with self._lock:
            if engine is not self._engine:
                first = self._engine is None
                self._engine, self._base, self._applied = engine, engine.profile, 0
                try:
                    self.control = BudgetControl.from_profile(
                        engine.profile, window_rows=self.options.window_rows, sample_every=self.options.sample_every,
                        step_rows=self.options.step_rows)
                except ValueError:
                    if first:
                        raise
                    logger.exception("budget control off for profile %s", engine.profile.version)
                    self.control = None
            if self.control is not None and self.control.step != self._applied:
                # The same profile version with the step's thresholds: the engine reads them per batch.
                engine.profile = dataclasses.replace(self._base, thresholds=self.control.thresholds)
                self._applied = self.control.step
            return engine

    def observe(self, decisions: pa.RecordBatch, *, reported: bool) -> pa.RecordBatch:
        """The decisions with ``budget_step`` (uint32, the step they were decided at); the tracker
        takes them in (not reported rows) and may step for the next batch."""
        with self._lock:
            control = self.control
            # A profile budget control cannot hold (logged) is decided at its own thresholds: step 0,
            # and the column stays, so that a stream's batches keep one schema.
            step = control.step if control is not None else 0
            if control is not None and not reported and control.observe(decisions):
                logger.info("budget control step %d (profile %s): thresholds %s, window rate %.4f", control.step,
                            control.profile_version, control.thresholds, control.history()[-1].window_rate)
        return decisions.append_column("budget_step", pa.array(np.full(decisions.num_rows, step, np.uint32)))

    def state(self) -> dict:
        with self._lock:
            return {"enabled": True, **self.control.state()} if self.control is not None else {"enabled": False}
