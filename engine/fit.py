"""``Profile.fit``: from labelled calibration data (and bank embeddings) to a triage profile.

Steps, each reported through ``progress(stage, done, total)``:

1. decode and validate the calibration batch (labels in [0, C) or -1 = unknown; unknown-label and
   unscoreable rows are left out and counted);
2. split the rows by a fixed hash of their id (reproducible): ``calibration.holdout`` of them
   choose thresholds, the rest fit the temperature, so threshold guarantees are computed on rows
   the temperature never saw (with holdout = 0 both use every row);
3. fit the temperature (global, optionally per source) and report ECE/NLL/Brier before and after;
4. build the k-NN bank from the bank embeddings (zero-norm or non-finite vectors are dropped and
   counted) and score the holdout rows against it exactly;
5. choose thresholds in the configured mode (budget or target risk);
6. report the expected escalation rate of each trigger and of their union on the holdout rows,
   with the k-NN distances the engine will compute under the chosen anomaly threshold (exact for
   every row near or above it, so the same anomaly bits as the exact scores).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from hitl_triage.kernels import audit_uniform, ensemble_signals

from .calibration import calibration_metrics, fit_temperature
from .config import TriageConfig
from .decode import BatchError, decode_batch, validate_labels
from .policy import CategoryTables
from .profile import Profile
from .scoring import TemperatureTable, ood_scores, rule_inputs
from .thresholds import choose_thresholds, escalation_rates

logger = logging.getLogger(__name__)

# Seed of the id hash that splits calibration rows (fixed, so every fit splits alike).
SPLIT_SEED = 0x7E57_5EED


def _report(progress, stage: str, done: int = 0, total: int = 1) -> None:
    if progress is not None:
        progress(stage, done, total)


def fit_profile(calibration, *, bank=None, config: TriageConfig | None = None, progress=None) -> Profile:
    """See :meth:`Profile.fit` and this module's docstring."""
    config = (config or TriageConfig()).check()
    started = time.perf_counter()
    report: dict = {"rows": {}}

    _report(progress, "decode calibration")
    x = decode_batch(calibration, device="cpu", embedding="optional" if bank is not None else "ignore", label="required")
    members, classes = x.logits.shape[1], x.logits.shape[2]
    if config.class_names and len(config.class_names) != classes:
        raise BatchError(f"class_names: expected {classes} names (C of the logits), found {len(config.class_names)}")
    known = np.asarray(validate_labels(x.label, x.ids, classes))
    raw = ensemble_signals(x.logits, 1.0)
    valid = np.asarray(raw.valid)
    if x.logits_missing is not None:
        valid &= ~np.asarray(x.logits_missing)
    labelled = known & valid
    report["rows"] = {
        "calibration": x.num_rows,
        "unknown_label": int((~known).sum()),
        "invalid": int((known & ~valid).sum()),
        "used": int(labelled.sum()),
    }
    if labelled.sum() < 100:
        raise BatchError(
            f"label: expected at least 100 calibration rows with a known label and finite logits, found {int(labelled.sum())}"
        )

    holdout = np.asarray(audit_uniform(x.ids, SPLIT_SEED)) < config.calibration.holdout
    fit_rows = labelled & ~holdout if config.calibration.holdout > 0 else labelled
    eval_rows = labelled & holdout if config.calibration.holdout > 0 else labelled
    report["rows"].update(temperature_fit=int(fit_rows.sum()), thresholds=int(eval_rows.sum()))
    labels = np.asarray(x.label).astype(np.int64)
    logits = x.logits

    # -- temperature ------------------------------------------------------------------------------
    _report(progress, "fit temperature")
    sources = None
    if config.calibration.per_source and x.source is not None:
        sources = np.asarray(x.source.to_numpy(zero_copy_only=False), dtype=object)
    fit_idx = torch.from_numpy(np.nonzero(fit_rows)[0])
    temp = fit_temperature(
        logits[fit_idx], labels[fit_rows], sources=None if sources is None else sources[fit_rows],
        min_rows_per_source=config.calibration.min_rows_per_source,
    )
    source_temperatures = {str(k): float(v) for k, v in (temp.per_source or {}).items()}

    # -- the rule's inputs on the threshold rows, as a run computes them -------------------------
    eval_idx = np.nonzero(eval_rows)[0]
    eval_rows_t = torch.from_numpy(eval_idx)
    heldout = x.take(eval_rows_t)
    table = TemperatureTable(temp.temperature, source_temperatures)
    s = table.signals(heldout.logits, heldout.source)
    codes = table.codes(heldout.source)
    eval_labels = labels[eval_rows]
    correct = np.asarray(s.predicted_class) == eval_labels
    report["calibration"] = {
        "temperature": temp.to_dict(),
        "holdout_before": calibration_metrics(heldout.logits, eval_labels, 1.0).to_dict(),
        "holdout_after": calibration_metrics(
            heldout.logits, eval_labels, table.values.numpy().astype(np.float64),
            codes if codes is not None else np.zeros(len(eval_idx), np.int32),
        ).to_dict(),
    }

    # -- bank ----------------------------------------------------------------------------------------
    index_obj, bank_ood = None, None
    if bank is not None:
        from .bank import build_bank

        if x.embedding is None:
            raise BatchError("embedding: expected an embedding column in the calibration data when a bank is given, found none")
        tuning = x.embedding[torch.from_numpy(np.nonzero(fit_rows)[0])]  # not the threshold rows
        index_obj, bank_report = build_bank(bank, config.bank, progress=progress, queries=tuning)
        report["bank"] = bank_report
        _report(progress, "score calibration rows against the bank")
        # Exactly (every row re-scored): the threshold is not known yet, and the engine's scores
        # are exact wherever a threshold could sit among them.
        bank_ood, _ = ood_scores(heldout, index_obj, config.bank.k, -math.inf)
    tables = CategoryTables.build(config.policy, config.tiers, "cpu")
    inputs, _, _ = rule_inputs(heldout, s, bank_ood, tables, config.audit, members=members, classes=classes)

    # -- thresholds -----------------------------------------------------------------------------------
    _report(progress, "choose thresholds")
    thresholds, report["thresholds"] = choose_thresholds(inputs, tables, correct, config.thresholds)

    # Expected rates: the rule itself on the threshold rows, with the distances the engine computes
    # under these thresholds (a run on the same rows fires the same bits).
    if index_obj is not None:
        run_ood, rescored = ood_scores(heldout, index_obj, config.bank.k, thresholds.ood)
        report["bank"]["rescored_share"] = float(rescored.double().mean()) if len(rescored) else 0.0
        inputs, _, _ = rule_inputs(heldout, s, run_ood, tables, config.audit, members=members, classes=classes)
    report["expected_rates"] = escalation_rates(inputs, thresholds, tables)
    report["fit_seconds"] = time.perf_counter() - started
    _report(progress, "done", 1, 1)
    return Profile(
        members=members, classes=classes, dim=index_obj.dim if index_obj is not None else None,
        temperature=float(temp.temperature), source_temperatures=source_temperatures,
        thresholds=thresholds, config=config, class_names=list(config.class_names), fit_report=report, bank=index_obj,
    )
