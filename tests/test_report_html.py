"""`triage report` (serve/report_html.py, serve/commands/report.py): a simulated day through the
whole loop in this process (fit, decide, queue with overlap, blind review and gold items,
simulated reviewers working it in twelve rounds, one of them drifting), then the report command,
rendered by a real headless Chromium. Oracles: the simulator's drifting source and the reviewer
made to drift, the queue's verdict export, and the page's own figures (each must hold data)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine_fixtures import one_torch_thread  # noqa: F401  (autouse)
from hitl_triage.serve.queue import QueueOptions, open_queue
from hitl_triage.serve.queue.gold import GoldPool
from hitl_triage.serve.sim import FleetConfig, simulate_fleet
from hitl_triage.serve.sim.reviewers import SimReviewer, truth_labels, work_queue
from test_cli import run_cli

ROUNDS = 12
FIGURES = 7  # reliability, escalations, OOD, overrides, accuracy, reviewers, drift


def simulated_day(d: Path, *, rows: int = 12_000) -> dict:
    """Fleet files, a profile, `triage run` decisions, and a worked review queue in ``d``."""
    from hitl_triage.engine.config import TriageConfig
    from hitl_triage.engine.engine import TriageEngine
    from hitl_triage.engine.profile import Profile

    files = simulate_fleet(d / "fleet.parquet", FleetConfig(rows=rows, sources=3, dim=16, calibration_rows=3000,
                                                             bank_rows=1500, seed=3, drift_source=2, drift_strength=3.0,
                                                             burst_ood_share=0.0))
    calibration = pq.read_table(files.calibration)
    profile = Profile.fit(calibration, bank=pq.read_table(files.bank, columns=["embedding"]),
                          config=TriageConfig.from_dict({"audit": {"base_rate": 0.05}}))
    profile_dir = profile.save(d / "profile")
    assert run_cli("run", "--profile", profile_dir, files.fleet, "--out", d / "decisions.parquet", "--device", "cpu")[0] == 0
    decisions, fleet = pq.read_table(d / "decisions.parquet"), pq.read_table(files.fleet)
    url = f"sqlite:///{d / 'review.db'}"
    options = QueueOptions(tiers=list(profile.config.tiers.order), overlap={"general": 0.3}, blind_share=0.2,
                           gold_share=0.15)
    engine = TriageEngine(profile, device="cpu")
    truth = truth_labels(pq.read_table(files.truth))
    crew = [SimReviewer("ann", "general", 0.05, seed=1),
            SimReviewer("bob", "general", 0.05, error_rate_end=0.6, ramp_verdicts=700, seed=2),
            SimReviewer("sam", "specialist", 0.03, seed=3), SimReviewer("jo", "adjudicator", 0.02, seed=4)]
    with open_queue(url, options) as queue:
        queue.gold = GoldPool(pa.Table.from_batches([engine.triage(b) for b in calibration.to_batches()]), calibration)
        step = -(-rows // ROUNDS)
        for r in range(ROUNDS):  # a round: a slice of the day in, the crew works it
            queue.enqueue(decisions.slice(r * step, step), fleet.slice(r * step, step))
            truth.update(dict(queue._db.execute("SELECT id, label FROM gold").fetchall()))  # the world knows them
            work_queue(queue, crew, truth, batch=32, ts=1e9 + 3600.0 * r)
        export = queue.verdicts()
    return {"files": files, "profile": profile_dir, "decisions": d / "decisions.parquet", "queue": url, "export": export,
            "options": options}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    day = simulated_day(d)
    toml = d / "triage.toml"
    toml.write_text("[queue]\nblind_share = 0.2\ngold_share = 0.15\n[queue.overlap]\ngeneral = 0.3\n")
    code, out = run_cli("report", "--queue", day["queue"], "--profile", day["profile"], "--out", d / "report.html",
                        "--decisions", day["decisions"], "--calibration", day["files"].calibration, "--config", toml)
    assert code == 0, out
    return d / "report.html", day, out, toml


def test_the_report_is_one_self_contained_file_with_every_plot_holding_data(report):
    path, day, out, _ = report
    page = path.read_text()
    assert "<script" not in page and "<link" not in page and not re.search(r"""(src|href)=["']?https?:""", page)
    points = [int(p) for p in re.findall(r"<figure data-points='(\d+)'>", page)]
    assert len(points) == FIGURES and all(p > 0 for p in points), points
    assert "no " + "verdicts yet" not in page


def test_the_report_names_the_drifting_source_and_the_drifting_reviewer(report):
    path, day, out, _ = report
    page = path.read_text()
    alerts = re.findall(r"<div class='alert'><b>(\w+)</b>: ([^<]+)</div>", page)
    kinds = {(k, m.split()[1].rstrip(":")) for k, m in alerts}
    assert ("source_drift", "cam-002") in kinds and ("reviewer_drift", "bob") in kinds, alerts
    assert not {m for k, m in kinds if k == "reviewer_drift"} - {"bob"}  # ann, sam and jo are steady
    assert not {m for k, m in kinds if k == "source_drift"} - {"cam-002"}
    assert "cam-002" in out and "bob" in out  # the command says so too
    # the override table counts the settled non-gold verdicts of the export
    settled = [v for v in day["export"].to_pylist() if v["action"] != "escalate" and v["gold_label"] is None]
    shown = sum(1 for v in settled if v["tier"] == "general" and not v["blind"])
    assert f"<td>general/shown</td><td>{shown:,}</td>" in page


def test_chromium_renders_the_report(report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    from PIL import Image

    path, day, out, _ = report
    shot = tmp_path / "report.png"
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    done = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,6400", path.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (6400, 1280)
    colors = {tuple(c) for c in image[::7, ::7].reshape(-1, 3)}
    assert len(colors) > 100  # plots, not a blank page
    blue, orange = (31, 119, 180), (255, 127, 14)  # the plots' first two colours are on screen
    assert any(np.all(np.abs(np.asarray(c) - blue) < 8) for c in colors)
    assert any(np.all(np.abs(np.asarray(c) - orange) < 8) for c in colors)


def test_queue_stats_shows_the_same_figures(report):
    path, day, out, toml = report
    code, text = run_cli("queue", "--config", toml, "stats", day["queue"])
    assert code == 0
    lines = {line.split()[1]: line for line in text.splitlines() if line.startswith("│")}
    assert "drifting" in lines["bob"] and all("ok" in lines[r] for r in ("ann", "sam", "jo"))
    settled = [v for v in day["export"].to_pylist() if v["action"] != "escalate" and v["gold_label"] is None]
    blind = sum(1 for v in settled if v["tier"] == "general" and v["blind"])
    assert f"{blind:,}" == lines["general/blind"].split("│")[2].strip()
    assert "alert reviewer_drift: reviewer bob" in " ".join(text.split())


def test_report_for_run_lets_simulated_reviewers_work_a_fresh_queue_first(report, tmp_path):
    from hitl_triage.serve.report_html import report_for_run

    path, day, out, _ = report
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    decisions, fleet = pq.read_table(day["decisions"]), pq.read_table(day["files"].fleet)
    with open_queue(url, QueueOptions(tiers=list(day["options"].tiers))) as queue:
        queue.enqueue(decisions, fleet)
    written = report_for_run(tmp_path / "run.html", queue_url=url, profile_dir=day["profile"], decisions=[day["decisions"]],
                             truth=day["files"].truth, review_limit=600)
    with open_queue(url) as queue:
        verdicts = queue.verdicts().num_rows
    assert 600 <= verdicts <= 600 + 256 * 4  # the limit, give or take the last claims of a round
    page = written.read_text()
    points = [int(p) for p in re.findall(r"<figure data-points='(\d+)'>", page)]
    # every plot but the reviewers' gold accuracy, which needs gold items (none in this queue)
    assert len(points) == FIGURES - 1 and all(p > 0 for p in points), points
    assert "no gold verdicts yet" in page


def test_report_refuses_missing_files_and_foreign_tables_by_name(report, tmp_path, capsys):
    path, day, out, _ = report
    code, _ = run_cli("report", "--queue", day["queue"], "--profile", day["profile"], "--out", tmp_path / "r.html",
                      "--decisions", tmp_path / "absent.parquet")
    said = " ".join(capsys.readouterr().err.split())
    assert code != 0 and "absent.parquet: expected a Parquet file, found none" in said, said
    pq.write_table(pa.table({"id": ["a"], "escalate": [True]}), tmp_path / "foreign.parquet")
    code, _ = run_cli("report", "--queue", day["queue"], "--profile", day["profile"], "--out", tmp_path / "r.html",
                      "--decisions", tmp_path / "foreign.parquet")
    said = " ".join(capsys.readouterr().err.split())
    assert code != 0 and "expected the engine's decision columns" in said and "'confidence'" in said, said
    assert not (tmp_path / "r.html").exists()


def test_error_bars_of_an_estimate_outside_its_clipped_interval_are_empty_not_negative():
    from hitl_triage.serve.report_html import _error_bars

    # A corrected estimate of 1.02 against an interval clipped at 1, a missing one, an ordinary one.
    bars = _error_bars([1.02, np.nan, 0.8], [0.95, np.nan, 0.7], [1.0, np.nan, 0.9])
    np.testing.assert_allclose(bars, [[0.07, 0.0, 0.1], [0.0, 0.0, 0.1]], atol=1e-12)
