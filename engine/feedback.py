"""Feedback: from a profile and the reviewers' verdicts to the next profile version.

    result = next_profile(Profile.load("profile/"), queue.verdicts(since=verdicts_since(profile)))
    write_next(result, "profile.g2/")     # profile.toml, bank/, watch/, feedback/, FEEDBACK.md

One round (README, "Feedback", states the rules):

1. The verdicts' final answers (:mod:`.feedback_rows`); the audit-sampled ones become labelled
   rows with their Horvitz-Thompson weight, beside the rows the previous version was fitted on
   (the calibration rows on the first round), weighted by the age rule. Only these rows refit
   anything: the escalated set is biased toward hard cases (DESIGN.md, audit sampling).
2. The temperature is re-fitted on them (weighted NLL, :func:`~.calibration.fit_temperature`).
3. In-scope edge cases join the bank; out-of-scope or wrong ones join the watch list, whose
   radius leaves ``watch_clear_share`` of the in-scope rows clear (:mod:`.watchlist`).
4. The rule's inputs on the rows at the new temperature, bank and watch list
   (:func:`~.scoring.rule_inputs`, as fit and run compute them); in budget mode the split is
   re-chosen (:func:`choose_split`); the thresholds are re-chosen in the profile's mode on the
   weighted rows (:func:`~.thresholds.choose_thresholds`).
5. The next version (generation + 1, ``parent`` the old version) and a readable diff.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from hitl_triage.kernels.knn import KnnIndex, knn_distance

from . import feedback_rows as fr
from .calibration import calibration_metrics, fit_temperature
from .config import FeedbackConfig
from .decode import decode_batch
from .policy import CategoryTables, RuleInputs, Thresholds, fire_triggers
from .profile import Profile
from .scoring import TemperatureTable, ood_scores, rule_inputs
from .thresholds import budget_thresholds, choose_thresholds
from .watchlist import WatchList, fit_radius, watch_distances

DIFF_FILE = "FEEDBACK.md"
REPORT_FILE = "feedback/report.json"
TRIGGER_NAMES = ("confidence", "disagreement", "anomaly")


@dataclasses.dataclass
class FeedbackResult:
    """The next version, the rows it was fitted on (stored beside it for the next round), the
    report of what changed and why, and :meth:`diff` (the same as Markdown)."""

    profile: Profile
    rows: pa.Table
    report: dict

    def diff(self) -> str:
        return render_diff(self.report)


def verdicts_since(profile: Profile) -> float | None:
    """Seconds since the epoch after which the verdicts are new to ``profile`` (the last verdict
    the round that made it used; None for a profile that feedback did not make)."""
    until = profile.fit_report.get("feedback", {}).get("verdicts_until")
    return float(until) if until is not None else None


def calibration_rows(calibration: pa.Table, profile: Profile) -> pa.Table:
    """The labelled calibration rows (the data contract with a ``label`` column) as the first
    round's old rows (:data:`.feedback_rows.ROW_COLUMNS`), one unit of weight each; ``problem``
    is the prediction at the profile's temperature differing from the label."""
    labels = calibration.column("label").to_numpy(zero_copy_only=False).astype(np.int32)
    calibration = calibration.filter(pa.array(labels >= 0))
    labels = labels[labels >= 0]
    x = decode_batch(calibration, members=profile.members, classes=profile.classes, device="cpu",
                     embedding="ignore", label="ignore")
    s = TemperatureTable(profile.temperature, profile.source_temperatures).signals(x.logits, x.source)
    names = calibration.schema.names
    return fr.rows_table(
        ids=calibration.column("id"), logits=calibration.column("logits"),
        embedding=calibration.column("embedding") if "embedding" in names else None,
        source=calibration.column("source").combine_chunks() if "source" in names else None,
        label=labels, problem=np.asarray(s.predicted_class) != labels,
        ood_score=np.full(len(labels), np.nan, np.float32), weight=np.ones(len(labels)), origin="calibration",
    )


def next_profile(profile: Profile, verdicts: pa.Table, *, calibration: pa.Table | None = None,
                 old_rows: pa.Table | None = None, config: FeedbackConfig | None = None) -> FeedbackResult:
    """The next version of ``profile`` from ``verdicts`` (the queue's verdict export, new since
    :func:`verdicts_since`). ``old_rows``: the rows the profile was fitted on (its
    ``feedback/rows.parquet``; read from its directory when None); on a first round,
    ``calibration`` (the labelled file ``triage fit`` read) stands in for them. See the module
    docstring for the steps."""
    started = time.perf_counter()
    config = (config or FeedbackConfig()).check()
    if old_rows is None and profile.path is not None and (profile.path / fr.ROWS_FILE).is_file():
        old_rows = pq.read_table(profile.path / fr.ROWS_FILE)
    if old_rows is None and calibration is not None:
        old_rows = calibration_rows(calibration, profile)
    final = fr.final_verdicts(verdicts)
    new_audit = fr.audit_rows(final, origin=f"audit g{profile.generation}") if final.num_rows else None
    n_audit = 0 if new_audit is None else new_audit.num_rows
    refit = n_audit >= config.min_audit_verdicts
    report: dict = {
        "parent": profile.version, "generation": profile.generation + 1,
        "verdicts": {"rows": verdicts.num_rows, "items": final.num_rows, "audit_items": n_audit,
                     "by_action": _counts(final, "action")},
        "rule": {"old_share": config.old_share, "min_share": config.min_share,
                 "min_audit_verdicts": config.min_audit_verdicts},
    }
    if "stored_at" in verdicts.schema.names and verdicts.num_rows:
        # The export rounds stored_at down to the microsecond: one more excludes the newest
        # verdict itself from the next round's `verdicts(since=...)` (stored_at > since).
        report["verdicts_until"] = (pc.max(verdicts.column("stored_at")).cast(pa.int64()).as_py() + 1) / 1e6
    elif verdicts_since(profile) is not None:
        report["verdicts_until"] = verdicts_since(profile)
    if refit:
        assert new_audit is not None
        rows = fr.combine(old_rows, new_audit, config.old_share, config.min_share)
    elif old_rows is not None and old_rows.num_rows:
        rows = old_rows
    else:
        raise fr.FeedbackError(
            f"verdicts: expected at least {config.min_audit_verdicts} audit-sampled verdicts (feedback.min_audit_verdicts) "
            f"or the calibration rows to keep, found {n_audit} and none")
    report["rows"] = _counts(rows, "origin") | {"total": rows.num_rows}

    # -- temperature --------------------------------------------------------------------------
    labels = rows.column("label").to_numpy(zero_copy_only=False)
    weights = rows.column("weight").to_numpy(zero_copy_only=False).astype(np.float64)
    temperature = profile.temperature
    x_all = _decode(rows, profile, with_embedding=False)
    in_scope = labels >= 0
    if refit:
        pick = torch.from_numpy(np.flatnonzero(in_scope))
        fit = fit_temperature(x_all.logits[pick], labels[in_scope].astype(np.int64), sample_weight=weights[in_scope])
        temperature = float(fit.temperature)
    report["temperature"] = {
        "old": profile.temperature, "new": temperature, "refit": refit,
        "why": (f"weighted NLL on {int(in_scope.sum())} in-scope rows ({n_audit} new audit verdicts)" if refit else
                f"kept: {n_audit} new audit verdicts, fewer than feedback.min_audit_verdicts = {config.min_audit_verdicts}"),
        "audit_ece_old": _audit_ece(new_audit, profile, profile.temperature),
        "audit_ece_new": _audit_ece(new_audit, profile, temperature),
    }
    if profile.source_temperatures:
        report["temperature"]["per_source"] = "kept (a weighted refit is global only)"

    # -- bank and watch list --------------------------------------------------------------------
    in_scope_cases, watched_cases = fr.edge_cases(final)
    bank = profile.bank
    added = 0
    if bank is not None and in_scope_cases.num_rows:
        bank = grown_bank(bank, fr.embeddings(in_scope_cases.column("embedding")))
        added = in_scope_cases.num_rows
    report["bank"] = {"old_rows": profile.bank.ntotal if profile.bank is not None else 0,
                      "added": added, "new_rows": bank.ntotal if bank is not None else 0,
                      "added_ids": in_scope_cases.column("id").to_pylist()[:20] if added else []}
    watch = profile.watch
    if watched_cases.num_rows and bank is not None:
        cases = [{"id": i, "action": a, "label": int(lab), "source": s, "reason_mask": int(m)} for i, a, lab, s, m in zip(
            watched_cases.column("id").to_pylist(), watched_cases.column("action").to_pylist(),
            watched_cases.column("label").to_pylist(), _column(watched_cases, "source"),
            watched_cases.column("reason_mask").to_pylist())]
        vectors = fr.embeddings(watched_cases.column("embedding"))
        watch = watch.extended(vectors, cases) if watch is not None else WatchList(vectors, cases)
    radius = profile.thresholds.watch_radius
    max_radius = config.watch_max_radius
    if max_radius is None:
        max_radius = profile.thresholds.ood if math.isfinite(profile.thresholds.ood) else 0.5
    x = _decode(rows, profile, with_embedding=bank is not None)
    if watch is not None:
        clear = in_distribution(rows, profile, watch) if x.embedding is not None else np.zeros(len(labels), bool)
        if x.embedding_missing is not None:
            clear = clear & ~x.embedding_missing.numpy()
        if clear.any():
            assert x.embedding is not None
            distances = np.asarray(watch.distances(x.embedding[torch.from_numpy(np.flatnonzero(clear))]))
            radius = fit_radius(distances, config.watch_clear_share, max_radius)
        else:
            radius = radius if radius is not None else -1.0
    report["watch"] = {"old_rows": len(profile.watch) if profile.watch is not None else 0,
                       "added": watched_cases.num_rows if watch is not profile.watch else 0,
                       "new_rows": len(watch) if watch is not None else 0,
                       "radius_old": profile.thresholds.watch_radius, "radius_new": radius,
                       "clear_share": config.watch_clear_share, "max_radius": max_radius}

    # -- thresholds and split ---------------------------------------------------------------------
    tables = CategoryTables.build(profile.config.policy, profile.config.tiers, "cpu")
    joined = (in_scope_cases.column("id").to_pylist() if added else [],
              watched_cases.column("id").to_pylist() if watch is not profile.watch else [])
    inputs = rows_inputs(x, rows, profile, temperature, bank, watch, radius, tables, joined=joined)
    correct = (np.asarray(inputs.predicted_class) == labels) & in_scope
    selection = dataclasses.replace(profile.config.thresholds)
    thresholds = dataclasses.replace(profile.thresholds, watch_radius=radius)
    if refit:
        if selection.mode == "budget":
            audited = np.asarray(rows.column("origin").to_pylist(), dtype=object) == f"audit g{profile.generation}"
            split, search = choose_split(inputs, tables, ~correct, weights, selection, config, radius,
                                         scored_rows=audited)
            report["split"] = search
            selection.split = split
        thresholds, chosen = choose_thresholds(inputs, tables, correct, selection, row_weights=weights,
                                               watch_radius=radius)
        report["thresholds_report"] = chosen
    report["thresholds"] = {"old": _plain(profile.thresholds), "new": _plain(thresholds), "mode": selection.mode}
    report["expected_rates"] = _weighted_rates(inputs, thresholds, tables, weights)
    report["feedback_seconds"] = time.perf_counter() - started

    new_config = dataclasses.replace(profile.config, thresholds=selection)
    fit_report = {**profile.fit_report, "feedback": _toml_ready(report)}
    new = Profile(
        members=profile.members, classes=profile.classes, dim=bank.dim if bank is not None else profile.dim,
        temperature=temperature, source_temperatures=dict(profile.source_temperatures), thresholds=thresholds,
        config=new_config, class_names=list(profile.class_names), fit_report=fit_report, bank=bank, watch=watch,
        generation=profile.generation + 1, parent=profile.version,
    )
    report["version"] = new.version
    return FeedbackResult(profile=new, rows=rows, report=report)


def write_next(result: FeedbackResult, directory: str | Path) -> Path:
    """Save the next version into ``directory`` (a new directory beside the old one): the
    profile, ``feedback/rows.parquet`` (what the next round refits on), ``feedback/report.json``
    and ``FEEDBACK.md`` (the diff). profile.toml is written last (:meth:`Profile.save`)."""
    directory = Path(directory)
    (directory / "feedback").mkdir(parents=True, exist_ok=True)
    pq.write_table(result.rows, directory / fr.ROWS_FILE)
    (directory / REPORT_FILE).write_text(json.dumps(_toml_ready(result.report), indent=1, default=str) + "\n")
    (directory / DIFF_FILE).write_text(result.diff())
    return result.profile.save(directory)


# ------------------------------------------------------------------------------------------------
# The pieces


def grown_bank(bank: KnnIndex, vectors: np.ndarray) -> KnnIndex:
    """A copy of ``bank`` with ``vectors`` appended (the old index, possibly memory-mapped and
    serving, is not touched)."""
    arrays = {name: np.array(value) for name, value in bank.to_arrays().items()}
    copy = KnnIndex.from_arrays(arrays.pop("vectors"), nprobe=bank.nprobe if bank.kind == "ivf" else None, **arrays)
    copy.add(vectors)
    return copy


def in_distribution(rows: pa.Table, profile: Profile, watch: WatchList) -> np.ndarray:
    """bool [n]: the refit rows the watch radius must keep clear: in scope, not a watched case
    themselves, and not anomalous when the engine saw them (k-NN distance at or below the old
    anomaly threshold; calibration rows, scored by nobody, always count)."""
    labels = rows.column("label").to_numpy(zero_copy_only=False)
    ood = rows.column("ood_score").to_numpy(zero_copy_only=False)
    watched = np.isin(np.asarray(rows.column("id").to_pylist(), dtype=object),
                      np.asarray([c["id"] for c in watch.cases], dtype=object))
    with np.errstate(invalid="ignore"):
        anomalous = ood > profile.thresholds.ood
    return (labels >= 0) & ~watched & ~anomalous


def rows_inputs(x, rows: pa.Table, profile: Profile, temperature: float, bank, watch: WatchList | None,
                radius: float | None, tables: CategoryTables, *, joined: tuple[list, list] = ([], [])) -> RuleInputs:
    """The rule's inputs on the refit rows, as a run computes them: signals at ``temperature``
    (per-source temperatures kept), the exact k-NN distance to ``bank`` (the distance the engine
    gave the item where the row kept no embedding), the watch distances.

    ``joined``: ids of the rows this round added to the bank and to the watch list. Each of
    them is scored leaving itself out (the (k + 1)-th bank distance, the second-nearest watched
    case): a row found in the bank or the watch list because it *is* there says nothing of the
    traffic, and counted in would shift the thresholds (on the simulated fleet, in-sample watch
    hits were 13 times the fresh rows')."""
    s = TemperatureTable(temperature, profile.source_temperatures).signals(x.logits, x.source)
    ids = np.asarray(rows.column("id").to_pylist(), dtype=object)
    in_bank, in_watch = (np.isin(ids, np.asarray(j, dtype=object)) for j in joined)
    ood = None
    if bank is not None:
        ood, _ = ood_scores(x, bank, profile.k, -math.inf)
        if in_bank.any() and x.embedding is not None:
            pick = torch.from_numpy(np.flatnonzero(in_bank))
            ood[pick] = torch.as_tensor(knn_distance(x.embedding[pick], bank, profile.k + 1)).to(torch.float32)
        stored = torch.from_numpy(rows.column("ood_score").to_numpy(zero_copy_only=False).astype(np.float32))
        without = x.embedding_missing if x.embedding_missing is not None else torch.zeros(len(ood), dtype=torch.bool)
        ood = torch.where(without, stored, ood)
    inputs, _, _ = rule_inputs(x, s, ood, tables, profile.config.audit, members=profile.members, classes=profile.classes)
    inputs.watch_distance = watch_distances(watch, x.embedding, radius, x.embedding_missing)
    if watch is not None and inputs.watch_distance is not None and in_watch.any() and len(watch) > 1:
        assert x.embedding is not None
        pick = torch.from_numpy(np.flatnonzero(in_watch))
        second = torch.as_tensor(knn_distance(x.embedding[pick], watch.index, 2)).to(torch.float32)
        inputs.watch_distance[pick] = second
    return inputs


def split_candidates(config: FeedbackConfig, fixed, active: tuple[bool, bool, bool]) -> list[tuple[float, float, float]]:
    """Splits on the simplex on a grid of ``split_step`` within the bounds, a trigger that cannot
    fire (no ensemble, no bank) held at 0, plus the configured ``fixed`` split."""
    steps = int(round(1.0 / config.split_step))
    out = []
    for a, b in itertools.product(range(steps + 1), repeat=2):
        c = steps - a - b
        if c < 0:
            continue
        split = (a / steps, b / steps, c / steps)
        if any(share > 0 and not on for share, on in zip(split, active)):
            continue
        if all(lo - 1e-9 <= share <= hi + 1e-9 or not on
               for share, lo, hi, on in zip(split, config.split_min, config.split_max, active)):
            out.append(split)
    total = sum(f for f, on in zip(fixed, active) if on)
    if total > 0:
        normalised = tuple(round(f / total, 12) if on else 0.0 for f, on in zip(fixed, active))
        if normalised not in out:
            out.append(normalised)  # type: ignore[arg-type]
    return out


def choose_split(inputs: RuleInputs, tables: CategoryTables, problem: np.ndarray, weights: np.ndarray, selection,
                 config: FeedbackConfig, radius: float | None, *, scored_rows: np.ndarray | None = None
                 ) -> tuple[tuple[float, float, float], dict]:
    """The budget split catching the most problems per reviewed item.

    For each candidate (:func:`split_candidates`) the budget thresholds on all the weighted rows
    (what the version will deploy), then, on the ``scored_rows`` only (this round's audit
    verdicts: the current traffic; older rows come from an older model or a calibration set),
    the Horvitz-Thompson share of problems among the rows a model trigger escalates. A candidate
    replaces the configured split only when its gain exceeds ``config.split_min_gain_se``
    standard errors of the paired difference (delta method on the weighted ratios): the winner
    of many noisy comparisons is optimistic, and a round of a few thousand audit verdicts
    escalates only a few hundred of them. Ties go to the candidate nearest the configured split."""
    active = (True, inputs.members > 1, inputs.ood_score is not None)
    fixed = _normalised(tuple(selection.split), active)
    scored = np.ones(len(weights), bool) if scored_rows is None else np.asarray(scored_rows, bool)
    w = np.where(scored, weights, 0.0)
    entries = []
    for split in split_candidates(config, tuple(selection.split), active):
        thresholds, rep = budget_thresholds(inputs, tables, selection.budget, split, vote_floor=selection.vote_floor,
                                            row_weights=weights, watch_radius=radius)
        fired = fire_triggers(inputs, thresholds, tables).model().numpy()
        escalated = float(w[fired].sum())
        per_item = float(w[fired & problem].sum()) / escalated if escalated > 0 else 0.0
        distance = sum((a - b) ** 2 for a, b in zip(split, fixed))
        entries.append({"split": split, "per_item": per_item, "fired": fired, "escalated": escalated,
                        "distance": distance, "rate": rep["union_rate"]})
    base = min(entries, key=lambda e: e["distance"])

    def influence(e) -> np.ndarray:  # linearised contribution of each row to the weighted ratio
        if e["escalated"] <= 0:
            return np.zeros(len(w))
        return w * e["fired"] * (problem - e["per_item"]) / e["escalated"]

    base_z = influence(base)
    for e in entries:
        e["gain"] = e["per_item"] - base["per_item"]
        e["se"] = float(np.sqrt(np.sum((influence(e) - base_z) ** 2)))
    eligible = [e for e in entries if e is base or e["gain"] > config.split_min_gain_se * e["se"]]
    best = max(eligible, key=lambda e: (e["per_item"], -e["distance"]))
    ranked = sorted(entries, key=lambda e: (-e["per_item"], e["distance"]))
    return best["split"], {
        "chosen": list(best["split"]), "fixed": list(fixed), "problems_per_item_chosen": best["per_item"],
        "problems_per_item_fixed": base["per_item"], "gain": best["gain"], "gain_se": best["se"],
        "escalation_rate_chosen": best["rate"], "candidates": len(entries), "scored_rows": int(scored.sum()),
        "best": [{"split": list(e["split"]), "problems_per_item": e["per_item"], "gain_se": e["se"]} for e in ranked[:5]],
        "bounds": {"min": list(config.split_min), "max": list(config.split_max), "step": config.split_step,
                   "min_gain_se": config.split_min_gain_se},
        "why": ("the split whose budget thresholds catch the most problems (corrections and out-of-scope verdicts, "
                "audit-weighted) per escalated row, by more than the noise" if best is not base else
                "kept: no split within the bounds beats it by more than "
                f"{config.split_min_gain_se} standard errors on this round's audit verdicts"),
    }


def _normalised(split, active) -> tuple[float, ...]:
    total = sum(f for f, on in zip(split, active) if on) or 1.0
    return tuple(f / total if on else 0.0 for f, on in zip(split, active))


def _decode(rows: pa.Table, profile: Profile, *, with_embedding: bool):
    names = ["id", "logits"] + (["embedding"] if with_embedding and "embedding" in rows.schema.names else []) + ["source"]
    table = rows.select(names)
    return decode_batch(table, members=profile.members, classes=profile.classes, device="cpu",
                        embedding="optional" if "embedding" in names else "ignore", label="ignore")


def _audit_ece(audit: pa.Table | None, profile: Profile, temperature: float) -> float | None:
    """The Horvitz-Thompson ECE of this round's audit verdicts at ``temperature`` (in-scope rows)."""
    if audit is None or audit.num_rows == 0:
        return None
    labels = audit.column("label").to_numpy(zero_copy_only=False)
    keep = labels >= 0
    if not keep.any():
        return None
    x = _decode(audit.filter(pa.array(keep)), profile, with_embedding=False)
    weights = audit.column("weight").to_numpy(zero_copy_only=False)[keep]
    return calibration_metrics(x.logits, labels[keep].astype(np.int64), temperature, sample_weight=weights).ece


def _weighted_rates(inputs: RuleInputs, thresholds: Thresholds, tables: CategoryTables, weights: np.ndarray) -> dict:
    fired = fire_triggers(inputs, thresholds, tables)
    total = float(weights.sum())
    rate = lambda m: float(weights[m.numpy()].sum()) / total  # noqa: E731
    rates = {name: rate(getattr(fired, name)) for name in ("confidence", "disagreement", "anomaly", "known_edge_case")}
    rates["union"] = rate(fired.model())
    rates["rows"] = int(len(weights))
    return rates


def _counts(table: pa.Table, column: str) -> dict:
    if table.num_rows == 0:
        return {}
    return {str(v["values"]): int(v["counts"]) for v in pc.value_counts(table.column(column)).to_pylist()}


def _column(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist() if name in table.schema.names else [None] * table.num_rows


def _plain(thresholds: Thresholds) -> dict:
    return {k: v for k, v in dataclasses.asdict(thresholds).items() if v is not None}


def _toml_ready(value):
    """No None, no inf-free guarantee needed (TOML writes inf), numpy scalars as Python ones."""
    if isinstance(value, dict):
        return {str(k): _toml_ready(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_toml_ready(v) for v in value if v is not None]
    if hasattr(value, "item"):
        return value.item()
    return value


# ------------------------------------------------------------------------------------------------
# The diff


def render_diff(report: dict) -> str:
    """What changed and why, as Markdown."""
    t, b, w = report["temperature"], report["bank"], report["watch"]
    th = report["thresholds"]
    lines = [
        f"# Feedback: {report['parent']} -> {report.get('version', '(unsaved)')}", "",
        f"Verdicts: {report['verdicts']['rows']} ({report['verdicts']['items']} items, "
        f"{report['verdicts']['audit_items']} audit-sampled); by action: {report['verdicts']['by_action']}.",
        (f"Refit rows: {report['rows']} (old rows together weigh {report['rule']['old_share']:.0%}, the new audit "
         "verdicts the rest, Horvitz-Thompson weighted)." if report["temperature"]["refit"] else
         f"Rows kept from the previous version: {report['rows']} (too few new audit verdicts to refit on)."), "",
        "## Temperature", "",
        f"- {t['old']:.4g} -> {t['new']:.4g}: {t['why']}.",
    ]
    if t.get("audit_ece_old") is not None:
        lines.append(f"- ECE on this round's audit verdicts (weighted): {t['audit_ece_old']:.4f} -> {t['audit_ece_new']:.4f}.")
    lines += ["", f"## Thresholds ({th['mode']} mode)", ""]
    for key in sorted(set(th["old"]) | set(th["new"])):
        old, new = th["old"].get(key), th["new"].get(key)
        if old != new:
            lines.append(f"- {key}: {_fmt(old)} -> {_fmt(new)}")
    if "split" in report:
        s = report["split"]
        lines += ["", "## Split (confidence, disagreement, anomaly)", "",
                  f"- {_fmt(s['fixed'])} -> {_fmt(s['chosen'])}: {s['why']}.",
                  f"- problems per reviewed item: {s['problems_per_item_fixed']:.4f} (configured split) -> "
                  f"{s['problems_per_item_chosen']:.4f} (chosen among {s['candidates']} within the bounds)."]
    rates = report.get("expected_rates", {})
    if rates:
        lines += ["", f"Expected escalation rate on the refit rows (weighted): {rates['union']:.4f} "
                      f"(known edge cases {rates['known_edge_case']:.4f})."]
    lines += ["", "## Reference bank", "",
              f"- {b['old_rows']} -> {b['new_rows']} rows: {b['added']} in-scope edge cases (escalated for anomaly, then "
              "confirmed or corrected) joined it, so inputs like them stop escalating on every source."]
    if b["added_ids"]:
        lines.append(f"- first ids: {', '.join(map(str, b['added_ids']))}")
    lines += ["", "## Watch list", "",
              f"- {w['old_rows']} -> {w['new_rows']} cases ({w['added']} added: out-of-scope verdicts and corrections "
              "of rows escalated for anomaly); rows within the radius escalate with KNOWN_EDGE_CASE on every source.",
              f"- radius: {_fmt(w['radius_old'])} -> {_fmt(w['radius_new'])} (leaves {w['clear_share']:.1%} of the in-scope "
              f"refit rows clear, at most {w['max_radius']})."]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


__all__ = ["FeedbackResult", "calibration_rows", "choose_split", "grown_bank", "in_distribution", "next_profile",
           "render_diff",
           "rows_inputs", "split_candidates", "verdicts_since", "write_next"]
