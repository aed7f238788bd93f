"""Prometheus gauges of the monitoring figures (:mod:`.monitoring`), set from them on every metrics
refresh. Gauges, not counters: each is a figure over the review queue, which every replica shares,
or a statistic of a window, never a count of this process's events. Ratios in [0, 1] (``_ratio``),
kappa and PSI as they are. Label sets are bounded: tiers and features by the profile, sources and
reviewers capped at :data:`MAX_LABELS` each (then "other").

| name | labels | what |
|---|---|---|
| hitl_triage_override_ratio | tier, view | verdicts that correct the model or call it out of scope (view: blind, shown) |
| hitl_triage_override_verdicts | tier, view | verdicts behind that ratio |
| hitl_triage_audited_accuracy_ratio | source, bound | accuracy of auto-accepted rows from audit verdicts (bound: estimate, low, high; source "all": the fleet) |
| hitl_triage_label_free_accuracy_ratio | source | mean calibrated confidence of the auto-accepted rows |
| hitl_triage_label_free_bias_ratio | source | that estimate's bias, measured by the audit |
| hitl_triage_cohen_kappa | tiers | Cohen's kappa of verdict pairs from two tiers ("general|specialist") |
| hitl_triage_fleiss_kappa | tier | Fleiss' kappa of a tier's overlap items |
| hitl_triage_drift_psi | source, feature | population stability index, latest window against the reference |
| hitl_triage_drift_alert | source | 1 while the source drifts |
| hitl_triage_reviewer_gold_accuracy_ratio | reviewer | accuracy on gold items |
| hitl_triage_reviewer_drift_alert | reviewer | 1 while the reviewer's gold accuracy has dropped |
| hitl_triage_monitoring_alerts | kind | active alerts (source_drift, fleet_drift, reviewer_drift) |
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Gauge

MAX_LABELS = 256
ALERT_KINDS = ("source_drift", "fleet_drift", "reviewer_drift")


class MonitoringGauges:
    def __init__(self, registry: CollectorRegistry):
        def gauge(name: str, doc: str, labels: list[str]) -> Gauge:
            return Gauge(name, doc, labels, registry=registry, multiprocess_mode="mostrecent")

        self.override = gauge("hitl_triage_override_ratio", "Verdicts that correct the model or call it out of scope.",
                              ["tier", "view"])
        self.override_n = gauge("hitl_triage_override_verdicts", "Verdicts behind the override ratio.", ["tier", "view"])
        self.audited = gauge("hitl_triage_audited_accuracy_ratio",
                             "Accuracy of auto-accepted rows estimated from audit verdicts (Horvitz-Thompson).",
                             ["source", "bound"])
        self.label_free = gauge("hitl_triage_label_free_accuracy_ratio",
                                "Mean calibrated confidence of the auto-accepted rows.", ["source"])
        self.bias = gauge("hitl_triage_label_free_bias_ratio", "Bias of the label-free accuracy, measured by the audit.",
                          ["source"])
        self.cohen = gauge("hitl_triage_cohen_kappa", "Cohen's kappa of verdict pairs from two tiers.", ["tiers"])
        self.fleiss = gauge("hitl_triage_fleiss_kappa", "Fleiss' kappa of a tier's overlap items.", ["tier"])
        self.psi = gauge("hitl_triage_drift_psi", "Population stability index against the reference.", ["source", "feature"])
        self.drift = gauge("hitl_triage_drift_alert", "1 while the source drifts from its reference.", ["source"])
        self.gold = gauge("hitl_triage_reviewer_gold_accuracy_ratio", "Reviewer accuracy on gold items.", ["reviewer"])
        self.reviewer_drift = gauge("hitl_triage_reviewer_drift_alert", "1 while the reviewer's gold accuracy has dropped.",
                                    ["reviewer"])
        self.alerts = gauge("hitl_triage_monitoring_alerts", "Active monitoring alerts.", ["kind"])
        self._names: dict[str, set[str]] = {"source": set(), "reviewer": set()}

    def _bounded(self, kind: str, value: str) -> str:
        seen = self._names[kind]
        if value in seen or len(seen) < MAX_LABELS:
            seen.add(value)
            return value
        return "other"

    def set(self, figures: dict) -> None:
        for key, o in figures.get("overrides", {}).get("by_tier_view", {}).items():
            tier, view = key.rsplit("/", 1)
            _set(self.override.labels(tier, view), o["rate"])
            self.override_n.labels(tier, view).set(o["verdicts"])
        accuracy = figures.get("accuracy", {})
        for source, a in [("all", accuracy.get("fleet")), *accuracy.get("sources", {}).items()]:
            if not a:
                continue
            label = source if source == "all" else self._bounded("source", source)
            for bound, field in (("estimate", "value"), ("low", "low"), ("high", "high")):
                _set(self.audited.labels(label, bound), a["audited"][field])
            _set(self.label_free.labels(label), a["label_free"])
            _set(self.bias.labels(label), a["label_free_bias"]["value"])
        for tiers, k in figures.get("agreement", {}).get("cohen", {}).items():
            _set(self.cohen.labels(tiers), k["value"])
        for tier, k in figures.get("agreement", {}).get("fleiss", {}).items():
            _set(self.fleiss.labels(tier), k["value"])
        for source, d in figures.get("drift", {}).items():
            label = self._bounded("source", source)
            for feature, f in d["features"].items():
                _set(self.psi.labels(label, feature), f["psi"])
            self.drift.labels(label).set(1.0 if d["drifting"] else 0.0)
        for name, r in figures.get("reviewers", {}).items():
            label = self._bounded("reviewer", name)
            _set(self.gold.labels(label), r["gold"]["value"])
            self.reviewer_drift.labels(label).set(1.0 if r["drifting"] else 0.0)
        kinds = [a["kind"] for a in figures.get("alerts", [])]
        for kind in ALERT_KINDS:
            self.alerts.labels(kind).set(kinds.count(kind))


def _set(gauge, value) -> None:
    """NaN (no sample yet) is exported as NaN, which Prometheus stores and graphs as a gap."""
    gauge.set(float(value) if value is not None else math.nan)
