"""The monitoring report: one self-contained HTML file (inline SVG plots drawn by matplotlib, inline
CSS, no script, nothing fetched) from the figures of :mod:`hitl_triage.engine.monitoring_report`
and the profile's fit report.

    figures, stats = monitoring_of(queue, profile, decisions=[...], calibration=...)
    write_report("report.html", figures, stats, profile)

Sections: alerts; reliability diagram before and after calibration; escalations by reason over
time; OOD-score distributions per source against the reference; override rates by tier (blind
and shown); audited accuracy with its interval against the label-free estimate; reviewers (gold
accuracy, agreement with the final label) and kappa; drift per source; slices ranked by expected
errors. Every plot's ``<figure>`` carries ``data-points``: how many values it drew (the tests
check that each holds data).
"""

from __future__ import annotations

import datetime as dt
import html
import io
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hitl_triage.engine.monitoring_report import AlertConfig, compute
from hitl_triage.engine.monitoring_stats import MonitorStats, StatsConfig

DEFAULT_WINDOWS = 12
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


# -- the figures -------------------------------------------------------------------------------------


def monitoring_of(queue, profile, *, decisions: Iterable[Path] = (), calibration: Path | None = None, engine=None,
                  windows: int = DEFAULT_WINDOWS, alerts: AlertConfig | None = None) -> tuple[dict, MonitorStats]:
    """The figures of a queue's verdicts and of decision files (``triage run`` outputs, read in
    order), cut into ``windows`` windows each: the decisions by row order, the verdicts by their
    time over their own span. ``calibration``: a labelled file whose decisions (by ``engine``, or
    one made from ``profile``) are the drift reference; without one each source's first windows are."""
    from hitl_triage.serve.service.monitoring import stats_config

    config = stats_config(profile, window_s=1.0)
    config = StatsConfig(**{**config.__dict__, "keep_windows": 10 * windows})
    stats = MonitorStats(config)
    files = [Path(p) for p in decisions]
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    per_window = max(1, -(-total // windows))
    seen = 0
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=per_window):
            start = 0  # cut batches at window borders so each row lands in its window
            while start < batch.num_rows:
                take = min(batch.num_rows - start, per_window - seen % per_window)
                stats.update(batch.slice(start, take), float(seen // per_window))
                seen += take
                start += take
    if calibration is not None:
        if engine is None:
            from hitl_triage.engine.engine import TriageEngine

            engine = TriageEngine(profile)
        table = pq.read_table(calibration)
        stats.set_reference(pa.Table.from_batches([engine.triage(b) for b in table.to_batches()]))
    if queue is not None:
        stats.update_verdicts(_rescaled(queue.verdicts(), windows))
    return compute(stats, alerts), stats


def _rescaled(verdicts: pa.Table, windows: int) -> pa.Table:
    """The verdicts with ``ts`` as a window index over their own time span (0 .. windows - 1)."""
    if verdicts.num_rows == 0:
        return verdicts
    ts = verdicts.column("ts").cast(pa.int64()).to_numpy() / 1e6
    lo, span = ts.min(), max(ts.max() - ts.min(), 1e-9)
    w = np.minimum(np.floor((ts - lo) / span * windows), windows - 1)
    return verdicts.set_column(verdicts.schema.get_field_index("ts"), "ts", pa.array(w, pa.float64()))


def report_for_run(out: str | Path, *, queue_url: str | None, profile_dir: str | Path, decisions: Iterable[Path],
                   calibration: Path | None = None, truth: Path | None = None, review_limit: int = 20_000,
                   windows: int = DEFAULT_WINDOWS) -> Path:
    """The report of one run (what ``triage demo`` ends with): with ``truth`` (a simulator's truth
    file), simulated reviewers (:mod:`hitl_triage.serve.sim.reviewers`, 2-5% errors) first work
    up to ``review_limit`` items of the queue, so that the verdict figures have data."""
    from hitl_triage.engine.profile import Profile
    from hitl_triage.serve.queue import QueueOptions, open_queue

    profile = Profile.load(profile_dir)
    if queue_url is None:
        figures, stats = monitoring_of(None, profile, decisions=decisions, calibration=calibration, windows=windows)
        return write_report(out, figures, stats, profile)
    with open_queue(queue_url, QueueOptions(tiers=list(profile.config.tiers.order))) as queue:
        if truth is not None:
            from hitl_triage.serve.sim.reviewers import SimReviewer, truth_labels, work_queue

            tiers = queue.options.tiers
            crew = [SimReviewer(f"{tier}-{i}", tier, error_rate=0.02 + 0.01 * i, seed=i)
                    for tier in tiers for i in range(1, 3 if tier == tiers[0] else 2)]
            work_queue(queue, crew, truth_labels(pq.read_table(truth, columns=["id", "label"])), batch=256,
                       limit=review_limit)
        figures, stats = monitoring_of(queue, profile, decisions=decisions, calibration=calibration, windows=windows)
    return write_report(out, figures, stats, profile)


# -- the page ----------------------------------------------------------------------------------------


def write_report(out: str | Path, figures: dict, stats: MonitorStats, profile, *, title: str = "hitl-triage monitoring"
                 ) -> Path:
    """Write the report to ``out`` (whole: a temporary file renamed); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    sections = [
        ("Alerts", _alerts(figures)),
        ("Calibration: reliability before and after", _reliability(profile)),
        ("Escalations by reason over time", _escalations(figures)),
        ("OOD score per source", _ood(figures, stats)),
        ("Override rates by tier", _overrides(figures)),
        ("Accuracy of auto-accepted traffic: audited vs label-free", _accuracy(figures)),
        ("Reviewers", _reviewers(figures)),
        ("Agreement (kappa)", _kappa(figures)),
        ("Data drift per source", _drift(figures)),
        ("Retraining priorities: slices by expected errors", _slices(figures)),
    ]
    fleet = figures.get("fleet", {})
    head = (f"<p class='meta'>profile {html.escape(str(profile.version))} &middot; {fleet.get('rows', 0):,} rows, "
            f"{_pct(fleet.get('escalation_rate'))} escalated &middot; written "
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC</p>")
    body = "\n".join(f"<section><h2>{html.escape(name)}</h2>\n{content}</section>" for name, content in sections)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; }}
h1 {{ margin-bottom: 0; }} .meta {{ color: #666; margin-top: 4px; }}
section {{ margin: 28px 0; }} h2 {{ border-bottom: 1px solid #ddd; padding-bottom: 4px; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 3px 10px; border-bottom: 1px solid #eee; text-align: right; }}
th {{ background: #f5f5f5; }} td:first-child, th:first-child {{ text-align: left; }}
figure {{ margin: 0; }} figure svg {{ max-width: 100%; height: auto; }}
.alert {{ background: #fdecea; border-left: 4px solid #d62728; padding: 6px 10px; margin: 4px 0; }}
.ok {{ background: #edf7ed; border-left: 4px solid #2ca02c; padding: 6px 10px; }}
.flag {{ color: #d62728; font-weight: bold; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{head}
{body}
</body></html>
"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def _svg(fig, points: int) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return f"<figure data-points='{int(points)}'>{text[text.index('<svg'):]}</figure>"


def _figure(w: float = 9, h: float = 3.4):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(w, h))
    ax.grid(alpha=0.3)
    return fig, ax


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _empty(what: str) -> str:
    return f"<p class='meta'>no {html.escape(what)} yet</p>"


# -- sections ----------------------------------------------------------------------------------------


def _alerts(figures: dict) -> str:
    alerts = figures.get("alerts", [])
    if not alerts:
        return "<div class='ok'>no alert: no source drifts from its reference, no reviewer's gold accuracy has dropped</div>"
    return "\n".join(f"<div class='alert'><b>{html.escape(a['kind'])}</b>: {html.escape(a['message'])}</div>" for a in alerts)


def _reliability(profile) -> str:
    cal = profile.fit_report.get("calibration", {})
    curves = [(name, cal.get(key, {}).get("reliability"), cal.get(key, {}).get("ece"))
              for name, key in (("before (T = 1)", "holdout_before"), ("after (fitted T)", "holdout_after"))]
    curves = [(n, r, e) for n, r, e in curves if r]
    if not curves:
        return _empty("reliability bins in the profile's fit report")
    fig, ax = _figure(6, 5)
    ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--", label="perfect calibration")
    points = 0
    for (name, bins, ece), color in zip(curves, (COLORS[3], COLORS[0])):
        conf, acc, count = (np.asarray(bins[k], float) for k in ("mean_confidence", "accuracy", "count"))
        keep = count > 0
        points += int(keep.sum())
        ax.plot(conf[keep], acc[keep], "o-", color=color, label=f"{name}: ECE {ece:.4f}")
    ax.set(xlabel="mean confidence in bin", ylabel="accuracy in bin", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left")
    return _svg(fig, points) + f"<p class='meta'>holdout rows of the calibration data; temperature {profile.temperature:.3f}</p>"


def _escalations(figures: dict) -> str:
    timeline = figures.get("timeline", [])
    if not timeline:
        return _empty("decisions (give --decisions)")
    w = [t["window"] for t in timeline]
    fig, ax = _figure()
    points = 0
    names = [n for n in timeline[0]["by_reason"] if any(t["by_reason"][n] for t in timeline)]
    for name, color in zip(names, COLORS):
        share = [t["by_reason"][name] / t["rows"] if t["rows"] else np.nan for t in timeline]
        points += len(share)
        ax.plot(w, share, "o-", ms=3, color=color, label=name)
    total = [t["escalated"] / t["rows"] if t["rows"] else np.nan for t in timeline]
    ax.plot(w, total, "k-", lw=2, label="escalated (any reason)")
    points += len(total)
    ax.set(xlabel="window", ylabel="share of rows")
    ax.yaxis.set_major_formatter(_percent())
    ax.legend(ncol=4, fontsize=8)
    return _svg(fig, points)


def _ood(figures: dict, stats: MonitorStats) -> str:
    drift = figures.get("drift", {})
    hist = {s: d["features"].get("ood_score") for s, d in drift.items() if "ood_score" in d["features"]}
    if not hist:
        return _empty("OOD scores (decisions with a k-NN bank)")
    edges = list(stats.config.ood_edges)
    labels = [f"<{edges[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(edges, edges[1:])] + [f">{edges[-1]:g}", "none"]
    fig, ax = _figure()
    x = np.arange(len(labels))
    width = 0.8 / (len(hist) + 1)
    ref = np.asarray(next(iter(hist.values()))["reference"], float)
    ax.bar(x - 0.4 + width / 2, ref / max(ref.sum(), 1), width, color="#bbb", label="reference")
    points = len(ref)
    for i, (source, h) in enumerate(sorted(hist.items())):
        now = np.asarray(h["histogram"], float)
        ax.bar(x - 0.4 + width * (i + 1.5), now / max(now.sum(), 1), width, color=COLORS[i % len(COLORS)],
               label=f"{source} (PSI {h['psi']:.3f})")
        points += len(now)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set(xlabel="k-NN distance in units of the anomaly threshold (latest window)", ylabel="share of rows")
    ax.legend(fontsize=8, ncol=3)
    return _svg(fig, points)


def _overrides(figures: dict) -> str:
    o = figures.get("overrides", {}).get("by_tier_view", {})
    if not o:
        return _empty("verdicts")
    tiers = sorted({k.rsplit("/", 1)[0] for k in o})
    fig, ax = _figure(8, 3.4)
    x = np.arange(len(tiers))
    points = 0
    for i, (view, color) in enumerate((("shown", COLORS[0]), ("blind", COLORS[1]))):
        entries = [o.get(f"{t}/{view}") for t in tiers]
        rate = np.array([e["rate"] if e else np.nan for e in entries])
        low = np.array([e["low"] if e else np.nan for e in entries])
        high = np.array([e["high"] if e else np.nan for e in entries])
        points += int(np.isfinite(rate).sum())
        ax.bar(x + (i - 0.5) * 0.38, np.nan_to_num(rate), 0.38, color=color, label=f"{view} prediction",
               yerr=_error_bars(rate, low, high), capsize=3)
    ax.set_xticks(x, tiers)
    ax.set(ylabel="override rate (95% interval)")
    ax.yaxis.set_major_formatter(_percent())
    ax.legend()
    rows = [[html.escape(k), f"{v['verdicts']:,}", f"{v['corrected']:,}", f"{v['out_of_scope']:,}", _pct(v["rate"])]
            for k, v in sorted(o.items())]
    by_reason = figures["overrides"].get("by_reason", {})
    reason_rows = [[html.escape(k), f"{v['verdicts']:,}", f"{v['corrected']:,}", f"{v['out_of_scope']:,}", _pct(v["rate"])]
                   for k, v in by_reason.items()]
    header = ["", "verdicts", "corrected", "out of scope", "override rate"]
    return (_svg(fig, points) + _table(["tier / view"] + header[1:], rows) + "<h3>by reason</h3>"
            + _table(["reason"] + header[1:], reason_rows))


def _error_bars(value, low, high) -> np.ndarray:
    """matplotlib's (2, n) error bars of an estimate and its interval. An interval clipped to
    [0, 1] can leave a point estimate outside it (the label-free estimate corrected by the
    audit's bias can pass 1): that side's bar is then empty, not negative."""
    value, low, high = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (value, low, high))
    return np.clip(np.nan_to_num(np.stack([value - low, high - value])), 0.0, None)


def _accuracy(figures: dict) -> str:
    acc = figures.get("accuracy", {})
    entries = [("fleet", acc.get("fleet"))] + sorted(acc.get("sources", {}).items())
    entries = [(n, a) for n, a in entries if a and (a["audited"]["n"] or a["auto_accepted"])]
    if not entries:
        return _empty("audit verdicts or decisions")
    fig, ax = _figure(9, 3.6)
    y = np.arange(len(entries))[::-1]
    points = 0
    for yi, (name, a) in zip(y, entries):
        au, cor = a["audited"], a["corrected"]
        if au["n"]:
            ax.errorbar(au["value"], yi + 0.15, xerr=_error_bars(au["value"], au["low"], au["high"]), fmt="o",
                        color=COLORS[0], capsize=4, label="audited (Horvitz-Thompson, 95%)" if yi == y[0] else None)
            points += 1
        if cor["n"]:
            ax.errorbar(cor["value"], yi - 0.15, xerr=_error_bars(cor["value"], cor["low"], cor["high"]), fmt="s",
                        color=COLORS[2], capsize=4, label="label-free corrected by the audit" if yi == y[0] else None)
            points += 1
        if a["label_free"] == a["label_free"] and a["auto_accepted"]:
            ax.plot(a["label_free"], yi, "D", color=COLORS[3], label="label-free (mean calibrated confidence)" if yi == y[0] else None)
            points += 1
    ax.set_yticks(y, [n for n, _ in entries])
    ax.set(xlabel="accuracy of auto-accepted rows")
    ax.xaxis.set_major_formatter(_percent())
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)
    rows = [[html.escape(n), f"{a['auto_accepted']:,}", f"{a['audited']['n']:,}",
             f"{_pct(a['audited']['value'])} [{_pct(a['audited']['low'])}, {_pct(a['audited']['high'])}]",
             _pct(a["label_free"]), _pct(a["label_free_bias"]["value"]), _pct(a["corrected"]["value"])] for n, a in entries]
    return _svg(fig, points) + _table(["", "auto-accepted rows", "audited", "audited accuracy (95%)", "label-free",
                                       "its bias (audit)", "corrected"], rows)


def _reviewers(figures: dict) -> str:
    reviewers = figures.get("reviewers", {})
    if not reviewers:
        return _empty("reviewer verdicts")
    fig, ax = _figure()
    points = 0
    for i, (name, r) in enumerate(sorted(reviewers.items())):
        w = [g["window"] for g in r["gold_by_window"]]
        a = [g["accuracy"] for g in r["gold_by_window"]]
        if w:
            ax.plot(w, a, "o-", ms=3, color=COLORS[i % len(COLORS)], label=name + (" (drift)" if r["drifting"] else ""))
            points += len(w)
    ax.set(xlabel="window", ylabel="accuracy on gold items")
    ax.yaxis.set_major_formatter(_percent())
    if points:
        ax.legend(fontsize=8, ncol=4)
    rows = []
    for name, r in sorted(reviewers.items()):
        g = r["gold"]
        flag = "<span class='flag'>drifting</span>" if r["drifting"] else "ok"
        rows.append([html.escape(name), f"{r['verdicts']:,}", f"{g['n']:,}", f"{_pct(g['value'])} [{_pct(g['low'])}, {_pct(g['high'])}]",
                     _pct(r["gold_baseline"]["value"]), _pct(r["gold_recent"]["value"]),
                     f"{r['adjudicated']['n']:,}", _pct(r["adjudicated"]["value"]), flag])
    return (_svg(fig, points) if points else _empty("gold verdicts")) + _table(
        ["reviewer", "verdicts", "gold items", "gold accuracy (95%)", "first windows", "latest window", "verdicts re-judged",
         "agree with the final label", "status"], rows)


def _kappa(figures: dict) -> str:
    ag = figures.get("agreement", {})
    rows = [[f"Cohen {html.escape(k)}", f"{v['n']:,}", _num(v["value"]), f"[{_num(v['low'])}, {_num(v['high'])}]"]
            for k, v in ag.get("cohen", {}).items()]
    rows += [[f"Fleiss {html.escape(k)}", f"{v['n']:,}", _num(v["value"]), f"[{_num(v['low'])}, {_num(v['high'])}]"]
             for k, v in ag.get("fleiss", {}).items()]
    if not rows:
        return _empty("items with two verdicts (overlap, escalations, adjudication)")
    return _table(["kappa", "pairs / items", "value", "95% interval"], rows)


def _drift(figures: dict) -> str:
    drift = figures.get("drift", {})
    if not drift:
        return _empty("decisions")
    sources = sorted(drift)
    features = sorted({f for d in drift.values() for f in d["features"]})
    fig, ax = _figure()
    x = np.arange(len(sources))
    width = 0.8 / max(len(features), 1)
    points = 0
    for i, feature in enumerate(features):
        values = [drift[s]["features"].get(feature, {}).get("psi", np.nan) for s in sources]
        points += int(np.isfinite(values).sum())
        ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(values), width, color=COLORS[i], label=feature)
    ax.axhline(AlertConfig().psi_alert, color=COLORS[3], ls="--", lw=1, label="alert level")
    ax.set_xticks(x, sources, rotation=30, fontsize=8)
    ax.set(ylabel="PSI, latest window vs reference")
    ax.legend(fontsize=8)
    rows = [[html.escape(s), _num(drift[s]["psi"]), "<span class='flag'>drifting</span>" if drift[s]["drifting"] else "ok"]
            for s in sources]
    return _svg(fig, points) + _table(["source", "largest PSI", "status"], rows)


def _slices(figures: dict) -> str:
    slices = figures.get("slices", [])
    if not slices:
        return _empty("decisions")
    rows = [[html.escape(str(s["source"])), str(s["predicted_class"]), html.escape(str(s["category"])), f"{s['rows']:,}",
             f"{s['expected_errors']:,.1f}", _pct(s["expected_error_rate"]), _pct(s["share_of_errors"])] for s in slices]
    return _table(["source", "predicted class", "category", "rows", "expected errors", "error rate", "share of all errors"],
                  rows) + "<p class='meta'>expected errors: the sum of 1 - calibrated confidence over the slice's rows</p>"


def _percent():
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0)
