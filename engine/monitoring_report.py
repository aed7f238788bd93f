"""The monitoring figures and alerts computed from :class:`.monitoring_stats.MonitorStats`: what
the service's ``Stats`` call, its Prometheus metrics, ``triage queue stats`` and ``triage report``
all show (one computation, so the figures agree everywhere).

``compute(stats, AlertConfig())`` returns plain JSON-able dicts:

- ``fleet`` / ``sources[s]``: rows, escalation rate, by reason and tier, edge-case frequency;
- ``timeline``: per window, rows and escalations by reason;
- ``overrides``: verdicts that correct the model or call it out of scope, by tier, reason, source,
  and blind against shown;
- ``accuracy``: per source and for the fleet, the audited accuracy of the auto-accepted traffic
  (Hajek, 95% interval), the label-free estimate (mean calibrated confidence), its bias measured
  by the audit and the corrected estimate;
- ``agreement``: Cohen's kappa per pair of tiers, Fleiss' kappa per tier;
- ``reviewers``: gold accuracy over time and agreement with the final (adjudicated) label, with
  the drift test;
- ``drift``: PSI and p-value per source and feature, latest windows against the reference;
- ``slices``: (source, predicted class, category) ranked by expected errors (sum of 1 - calibrated
  confidence): where the model's errors concentrate, the retraining priorities;
- ``alerts``: ``source_drift`` (a source drifts while most others do not), ``fleet_drift`` (at
  least ``fleet_share`` of the sources drift together), ``reviewer_drift``.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np

from .monitoring_estimators import (
    AUDIT_FIELDS, Estimate, audited_accuracy, cohen_kappa, drop_pvalue, fleiss_kappa, label_free_accuracy, psi, wilson,
)
from .monitoring_stats import DRIFT_FEATURES, EDGE_CASE_REASONS, REASON_NAMES, MonitorStats, Sums


@dataclasses.dataclass(frozen=True)
class AlertConfig:
    """When alerts fire. Drift: a source whose latest ``drift_windows`` windows have, on some
    feature, PSI >= ``psi_alert`` with p-value < ``drift_p`` against its reference; ``fleet_share``
    of the sources (at least two) drifting together is fleet drift. Reviewer drift: gold accuracy in
    the latest ``recent_windows`` windows lower than in the reviewer's first ``baseline_windows``
    windows with gold items (their calibration period) by ``gold_min_drop`` or more, with a
    one-sided p-value < ``gold_p``, on at least ``min_gold`` gold items on each side."""

    psi_alert: float = 0.25
    drift_p: float = 1e-3
    drift_windows: int = 1
    fleet_share: float = 0.5
    gold_p: float = 0.01
    gold_min_drop: float = 0.1
    recent_windows: int = 1
    baseline_windows: int = 2
    min_gold: int = 10
    top_slices: int = 20


WINDOWED = frozenset(("rows", "escalated", "auto", "auto_conf", "reason", "tier", "slice", "override", "audit"))
"""Kinds whose figures a ``span`` limits (drift and reviewer drift compare windows themselves;
kappa is over every pair the queue holds)."""


def compute(stats: MonitorStats, alerts: AlertConfig | None = None, *, span: int | None = None) -> dict:
    """The figures (see the module docstring). ``span``: rates, overrides, accuracy and slices
    over the latest ``span`` windows only (a sliding window; None: every window kept)."""
    a = alerts or AlertConfig()
    d, v = stats.decisions, stats.verdicts
    if span is not None:
        d, v = _latest(d, stats.windows(), span), _latest(v, sorted({k[1] for k in v if k[0] in WINDOWED}), span)
    out: dict = {"window_s": stats.config.window_s, "windows": stats.windows(), "span": span}
    out["fleet"], out["sources"] = _traffic(d)
    out["timeline"] = _timeline(d)
    out["overrides"] = _overrides(v)
    out["accuracy"] = _accuracy(d, v)
    out["agreement"] = _agreement(v)
    out["reviewers"] = _reviewers(v, a)
    out["drift"] = _drift(stats, a)
    out["slices"] = _slices(d, a.top_slices)
    out["alerts"] = _alerts(out, a)
    return out


def _latest(sums: Sums, windows: list[int], span: int) -> Sums:
    """``sums`` with the windowed kinds' entries of the latest ``span`` windows only."""
    if span < 1:
        raise ValueError(f"span: expected a number of windows >= 1, found {span!r}")
    keep = set(windows[-span:])
    return Sums({k: x for k, x in sums.items() if k[0] not in WINDOWED or k[1] in keep})


# -- traffic -----------------------------------------------------------------------------------------


def _traffic(d: Sums) -> tuple[dict, dict]:
    per: dict[str, Sums] = collections.defaultdict(Sums)
    for key, value in d.items():
        kind = key[0]
        if kind in ("rows", "escalated", "auto", "auto_conf"):
            per[key[2]][kind] += value
        elif kind == "reason":
            per[key[2]]["reason:" + key[3]] += value
        elif kind == "tier":
            per[key[2]]["tier:" + key[3]] += value
    fleet: Sums = Sums()
    for counts in per.values():
        fleet.add(counts)
    return _rates(fleet), {s: _rates(c) for s, c in sorted(per.items())}


def _rates(c: Sums) -> dict:
    rows = c["rows"]

    def rate(x: float) -> float:
        return x / rows if rows else math.nan

    by_reason = {name: c["reason:" + name] for name in REASON_NAMES.values()}
    return {
        "rows": int(rows), "escalated": int(c["escalated"]), "escalation_rate": rate(c["escalated"]),
        "auto_accepted": int(c["auto"]),
        "by_reason": {k: int(x) for k, x in by_reason.items()},
        "reason_rate": {k: rate(x) for k, x in by_reason.items()},
        "edge_case_rate": {k: rate(by_reason[k]) for k in EDGE_CASE_REASONS},
        "by_tier": {k[5:]: int(x) for k, x in sorted(c.items()) if k.startswith("tier:")},
    }


def _timeline(d: Sums) -> list[dict]:
    rows: dict[int, Sums] = collections.defaultdict(Sums)
    for key, value in d.items():
        if key[0] in ("rows", "escalated"):
            rows[key[1]][key[0]] += value
        elif key[0] == "reason":
            rows[key[1]][key[3]] += value
    return [{"window": w, "rows": int(c["rows"]), "escalated": int(c["escalated"]),
             "by_reason": {name: int(c[name]) for name in REASON_NAMES.values()}} for w, c in sorted(rows.items())]


# -- overrides ----------------------------------------------------------------------------------------


def _overrides(v: Sums) -> dict:
    groups: dict[str, dict[str, Sums]] = {g: collections.defaultdict(Sums)
                                                          for g in ("tier", "source", "reason", "view", "tier_view")}
    total: Sums = Sums()
    for key, value in v.select("override"):
        _, _, tier, source, mask, blind, field = key
        view = "blind" if blind else "shown"
        total[field] += value
        groups["tier"][tier][field] += value
        groups["source"][source][field] += value
        groups["view"][view][field] += value
        groups["tier_view"][f"{tier}/{view}"][field] += value
        for bit, name in REASON_NAMES.items():
            if mask & bit:
                groups["reason"][name][field] += value
    out = {"all": _override_rate(total)}
    for name, by in groups.items():
        out["by_" + name] = {k: _override_rate(c) for k, c in sorted(by.items())}
    return out


def _override_rate(c: Sums) -> dict:
    n, changed = c["n"], c["corrected"] + c["oos"]
    est = wilson(changed, n)
    return {"verdicts": int(n), "corrected": int(c["corrected"]), "out_of_scope": int(c["oos"]),
            "rate": est.value, "low": est.low, "high": est.high}


# -- accuracy -----------------------------------------------------------------------------------------


def _accuracy(d: Sums, v: Sums) -> dict:
    audit: dict[str, Sums] = collections.defaultdict(Sums)
    for key, value in v.select("audit"):
        audit[key[2]][key[3]] += value
    auto: dict[str, Sums] = collections.defaultdict(Sums)
    for key, value in d.items():
        if key[0] in ("auto", "auto_conf"):
            auto[key[2]][key[0]] += value
    fleet_audit: Sums = Sums()
    fleet_auto: Sums = Sums()
    for c in audit.values():
        fleet_audit.add(c)
    for c in auto.values():
        fleet_auto.add(c)
    sources = sorted(set(audit) | set(auto))
    return {"fleet": _accuracy_of(fleet_auto, fleet_audit),
            "sources": {s: _accuracy_of(auto.get(s, Sums()), audit.get(s, Sums()))
                        for s in sources}}


def _accuracy_of(auto: Sums, audit: Sums) -> dict:
    sums = {f: float(audit[f]) for f in AUDIT_FIELDS}
    cbpe, bias, corrected = label_free_accuracy(auto["auto_conf"], int(auto["auto"]), sums)
    return {"auto_accepted": int(auto["auto"]), "audited": audited_accuracy(sums).to_dict(), "label_free": cbpe,
            "label_free_bias": bias.to_dict(), "corrected": corrected.to_dict()}


# -- agreement ----------------------------------------------------------------------------------------


def _agreement(v: Sums) -> dict:
    pairs: dict[tuple[str, str], dict[tuple[int, int], float]] = collections.defaultdict(dict)
    for key, value in v.select("cohen"):
        pairs[(key[1], key[2])][(key[3], key[4])] = value
    cohen = {}
    for (t1, t2), cells in sorted(pairs.items()):
        cats = sorted({c for cell in cells for c in cell})
        index = {c: i for i, c in enumerate(cats)}
        m = np.zeros((len(cats), len(cats)))
        for (a, b), value in cells.items():
            m[index[a], index[b]] += value
        if t1 == t2:  # one tier: which of the two is "first" is arbitrary, so count both ways
            m = (m + m.T) / 2
        cohen[f"{t1}|{t2}"] = cohen_kappa(m).to_dict()
    fleiss = {}
    per_tier: dict[str, Sums] = collections.defaultdict(Sums)
    category_counts: dict[str, Sums] = collections.defaultdict(Sums)
    for key, value in v.items():
        if key[0] == "fleiss":
            per_tier[key[1]][key[2]] += value
        elif key[0] == "fleiss_cat":
            category_counts[key[1]][key[2]] += value
    for tier, c in sorted(per_tier.items()):
        fleiss[tier] = fleiss_kappa(int(c["items"]), c["p"], c["pp"], np.array(list(category_counts[tier].values()))).to_dict()
    return {"cohen": cohen, "fleiss": fleiss}


# -- reviewers ----------------------------------------------------------------------------------------


def _reviewers(v: Sums, a: AlertConfig) -> dict:
    gold: dict[str, dict[int, Sums]] = collections.defaultdict(lambda: collections.defaultdict(Sums))
    adjudicated: dict[str, Sums] = collections.defaultdict(Sums)
    reviewed: Sums = Sums()
    for key, value in v.items():
        if key[0] == "reviewed":
            reviewed[key[2]] += value
        elif key[0] == "gold":
            gold[key[2]][key[1]][key[3]] += value
        elif key[0] == "adjudicated":
            adjudicated[key[2]][key[3]] += value
    out = {}
    for reviewer in sorted(set(gold) | set(adjudicated) | set(reviewed)):
        windows = sorted(gold[reviewer].items())
        total = sum((c for _, c in windows), Sums())
        if len(windows) >= a.baseline_windows + a.recent_windows:
            recent = sum((c for _, c in windows[-a.recent_windows:]), Sums())
            before = sum((c for _, c in windows[:a.baseline_windows]), Sums())
        else:
            recent, before = Sums(), Sums()
        p = drop_pvalue(before["correct"], before["n"], recent["correct"], recent["n"])
        drop = (before["correct"] / before["n"] - recent["correct"] / recent["n"]) if before["n"] and recent["n"] else math.nan
        drifting = bool(recent["n"] >= a.min_gold and before["n"] >= a.min_gold and drop >= a.gold_min_drop and p < a.gold_p)
        adj = adjudicated[reviewer]
        out[reviewer] = {
            "verdicts": int(reviewed[reviewer]),
            "gold": wilson(total["correct"], total["n"]).to_dict(),
            "gold_recent": wilson(recent["correct"], recent["n"]).to_dict(),
            "gold_baseline": wilson(before["correct"], before["n"]).to_dict(),
            "gold_by_window": [{"window": w, "n": int(c["n"]), "accuracy": c["correct"] / c["n"] if c["n"] else math.nan}
                               for w, c in windows],
            "drop": drop, "drop_p": p, "drifting": drifting,
            "adjudicated": wilson(adj["agree"], adj["n"]).to_dict(),
        }
    return out


# -- drift --------------------------------------------------------------------------------------------


def _drift(stats: MonitorStats, a: AlertConfig) -> dict:
    cfg = stats.config
    windows = stats.windows()
    if not windows:
        return {}
    latest = set(windows[-a.drift_windows:])
    own_reference = set(windows[: cfg.reference_windows]) - latest
    hist: dict[tuple[str, str, str], np.ndarray] = {}

    def add(which: str, source: str, feature: str, b: int, value: float) -> None:
        key = (which, source, feature)
        if key not in hist:
            hist[key] = np.zeros(cfg.bins(feature))
        hist[key][b] += value

    for key, value in stats.decisions.select("hist"):
        _, w, source, feature, b = key
        if w in latest:
            add("now", source, feature, b, value)
        if not stats.reference and w in own_reference:
            add("ref", source, feature, b, value)
    for key, value in stats.reference.select("hist"):
        add("ref", "*", key[3], key[4], value)
    out = {}
    for source in sorted({k[1] for k in hist if k[0] == "now"}):
        features = {}
        for feature in DRIFT_FEATURES:
            now = hist.get(("now", source, feature))
            ref = hist.get(("ref", "*" if stats.reference else source, feature))
            if now is None or ref is None:
                continue
            index, p = psi(now, ref)
            features[feature] = {"psi": index, "p": p, "rows": int(now.sum()), "reference_rows": int(ref.sum()),
                                 "histogram": now.tolist(), "reference": ref.tolist()}
        worst = max(features.values(), key=lambda f: f["psi"] if f["psi"] == f["psi"] else -1, default=None)
        out[source] = {"features": features, "psi": worst["psi"] if worst else math.nan,
                       "drifting": any(f["psi"] >= a.psi_alert and f["p"] < a.drift_p for f in features.values())}
    return out


# -- slices -------------------------------------------------------------------------------------------


def _slices(d: Sums, top: int) -> list[dict]:
    rows: Sums = Sums()
    errors: Sums = Sums()
    for key, value in d.select("slice"):
        slice_key = key[2:5]
        (rows if key[5] == "rows" else errors)[slice_key] += value
    total = sum(errors.values()) or 1.0
    ranked = sorted(rows, key=lambda k: -errors[k])[:top]
    return [{"source": s, "predicted_class": int(p), "category": c, "rows": int(rows[(s, p, c)]),
             "expected_errors": errors[(s, p, c)], "expected_error_rate": errors[(s, p, c)] / rows[(s, p, c)],
             "share_of_errors": errors[(s, p, c)] / total} for s, p, c in ranked]


# -- alerts -------------------------------------------------------------------------------------------


def _alerts(out: dict, a: AlertConfig) -> list[dict]:
    alerts = []
    drift = out["drift"]
    drifting = [s for s, e in drift.items() if e["drifting"]]
    if drifting and len(drift) >= 2 and len(drifting) >= max(2, math.ceil(a.fleet_share * len(drift))):
        alerts.append({"kind": "fleet_drift", "sources": drifting,
                       "message": f"{len(drifting)} of {len(drift)} sources drift together (a fleet-wide change)"})
    else:
        for s in drifting:
            feature = max(drift[s]["features"].items(), key=lambda kv: kv[1]["psi"])
            alerts.append({"kind": "source_drift", "source": s, "feature": feature[0], "psi": feature[1]["psi"],
                           "message": f"source {s} drifts from its reference ({feature[0]}: PSI "
                                      f"{feature[1]['psi']:.3f}) while {len(drift) - len(drifting)} others do not"})
    for name, r in out["reviewers"].items():
        if r["drifting"]:
            alerts.append({"kind": "reviewer_drift", "reviewer": name, "drop": r["drop"],
                           "message": f"reviewer {name}: gold accuracy {r['gold_recent']['value']:.1%} lately against "
                                      f"{r['gold_baseline']['value']:.1%} at first (p = {r['drop_p']:.2g})"})
    return alerts


def estimate(d: dict) -> Estimate:
    """An :class:`Estimate` back from its ``to_dict``."""
    return Estimate(**d)
