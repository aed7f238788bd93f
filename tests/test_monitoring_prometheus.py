"""The monitoring figures of a running `triage serve`, read back through its Stats call and a real
Prometheus server scraping it (issue 18, items 2-3). The server has a SQLite review queue with
overlap, blind review and gold items drawn from a labelled calibration file (also its drift
reference); rows go in over triage.v1, simulated reviewers (serve/sim/reviewers.py) work the queue
from this process with the truth the test drew. Oracles: the rows sent, and the queue's verdict
export counted by hand (verdicts per tier and view, gold answers right per reviewer). The
monitoring dashboard's queries all return data, the monitoring rules load, evaluate and do not
fire on this stationary traffic, and promtool checks them and runs their unit tests."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine_fixtures import contract_table, known_ensemble, one_torch_thread  # noqa: F401  (autouse)
from hitl_triage.serve.commands.queue import open_from_args
from hitl_triage.serve.proto.triage.v1 import triage_pb2, triage_pb2_grpc
from hitl_triage.serve.sim.reviewers import SimReviewer, work_queue
from test_service_metrics import Prometheus, metric_names, prometheus_binary
from test_service_ops import C, M, channel_to, predictions, profile_dir, request, scrape, serving  # noqa: F401

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "monitoring_alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "monitoring.json"
BATCHES = (800, 1500, 700)


@pytest.fixture(scope="module")
def world(profile_dir, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("monitoring")
    prometheus_binary()  # or skip before a server starts
    logits, labels, _ = known_ensemble(np.random.default_rng(5), 1500, members=M, classes=C)
    pq.write_table(contract_table([f"cal-{i}" for i in range(1500)], logits, label=labels), d / "calibration.parquet")
    toml = d / "triage.toml"
    toml.write_text(f'[queue]\nblind_share = 0.2\ngold_share = 0.2\ngold_pool = "{d / "calibration.parquet"}"\n'
                    '[queue.overlap]\ngeneral = 0.5\n')
    queue_url = f"sqlite:///{d / 'review.db'}"
    with serving(profile_dir, queue_url, d, "--metrics-port", "0", "--config", str(toml)) as server:
        prometheus = Prometheus(d, [f"127.0.0.1:{server.ports['metrics']}"], RULES)
        try:
            stub = triage_pb2_grpc.TriageStub(channel_to(server))
            truth = {}
            for i, n in enumerate(BATCHES):
                batch = predictions(n, prefix=f"mon{i}", seed=40 + i)
                truth.update(zip(batch.column("id").to_pylist(), known_ensemble(np.random.default_rng(40 + i), n,
                                                                               members=M, classes=C)[1].tolist()))
                stub.Triage(request(batch), timeout=60)
            stub.Report(request(predictions(20, prefix="rep", seed=9)), timeout=60)
            truth.update({f"rep-{i}": 0 for i in range(20)})
            queue = open_from_args(queue_url, toml)
            truth.update(dict(queue._db.execute("SELECT id, label FROM gold").fetchall()))  # the world knows them
            crew = [SimReviewer("ann", "general", 0.1, seed=1), SimReviewer("bob", "general", 0.3, seed=2),
                    SimReviewer("sam", "specialist", 0.05, seed=3), SimReviewer("jo", "adjudicator", seed=4)]
            work_queue(queue, crew, truth, batch=32)
            export = queue.verdicts()
            queue.close()
            yield server, stub, prometheus, export
        finally:
            prometheus.close()


def hand_counts(export):
    """Settled non-gold verdicts per (tier, view), and per reviewer (gold answers, right ones)."""
    verdicts = collections.Counter()
    gold = collections.defaultdict(lambda: [0, 0])
    for v in export.to_pylist():
        if v["action"] == "escalate":
            continue
        if v["gold_label"] is not None:
            gold[v["reviewer"]][0] += 1
            gold[v["reviewer"]][1] += v["action"] != "out_of_scope" and v["label"] == v["gold_label"]
            continue
        verdicts[(v["tier"], "blind" if v["blind"] else "shown")] += 1
    return verdicts, gold


def test_stats_carries_the_monitoring_figures_of_what_was_sent_and_reviewed(world):
    server, stub, prometheus, export = world
    figures = json.loads(stub.Stats(triage_pb2.StatsRequest(), timeout=60).monitoring_json)
    verdicts, gold = hand_counts(export)
    assert figures["fleet"]["rows"] == sum(BATCHES) + 20
    assert figures["fleet"]["by_reason"]["reported"] == 20
    got = {tuple(k.rsplit("/", 1)): v["verdicts"] for k, v in figures["overrides"]["by_tier_view"].items()}
    assert got == dict(verdicts) and ("general", "blind") in got
    for name, (n, right) in gold.items():
        assert figures["reviewers"][name]["gold"]["n"] == n and figures["reviewers"][name]["gold"]["value"] == pytest.approx(right / n)
    assert figures["reviewers"]["bob"]["gold"]["value"] < figures["reviewers"]["sam"]["gold"]["value"]
    assert figures["agreement"]["fleiss"]["general"]["n"] > 0
    assert figures["accuracy"]["fleet"]["audited"]["n"] > 0
    assert set(figures["drift"]) == {"camera-0", "camera-1", "camera-2"}  # against the calibration file
    assert figures["alerts"] == []


def test_prometheus_holds_the_dashboard_series_and_they_count_what_was_sent(world):
    server, stub, prometheus, export = world
    verdicts, gold = hand_counts(export)
    rows = float(sum(BATCHES) + 20)
    assert prometheus.until("sum(hitl_triage_rows_total)", {(): rows}) == {(): rows}
    expected = {k: float(v) for k, v in verdicts.items()}
    assert prometheus.until("max by (tier, view) (hitl_triage_override_verdicts)", expected) == expected
    accuracy = prometheus.value("max by (reviewer) (hitl_triage_reviewer_gold_accuracy_ratio)")
    assert accuracy.keys() == {(name,) for name in gold}
    for name, (n, right) in gold.items():
        assert accuracy[(name,)] == pytest.approx(right / n)
    bounds = prometheus.value('max by (bound) (hitl_triage_audited_accuracy_ratio{source="all"})')
    assert bounds[("low",)] <= bounds[("estimate",)] <= bounds[("high",)]
    exported = {name for name, _ in scrape(server.ports["metrics"])}
    unknown = (metric_names(DASHBOARD.read_text()) | metric_names(RULES.read_text())) - exported
    assert not unknown, f"the monitoring dashboard or rules name metrics the service does not export: {sorted(unknown)}"
    time.sleep(2.5)  # rate() needs two scrapes in its window
    empty = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            promql = target["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*")
            if not prometheus.query(promql):
                empty.append(f"{panel['title']}: {promql}")
    assert not empty, "monitoring dashboard queries without data:\n" + "\n".join(empty)
    deadline = time.monotonic() + 30
    while True:
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        if rules and all(r["health"] == "ok" for r in rules) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(rules) == RULES.read_text().count("- alert:")
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    assert not [r["name"] for r in rules if r["state"] != "inactive"]


def test_promtool_checks_and_unit_tests_the_monitoring_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    for argv in ([promtool, "check", "rules", RULES.name], [promtool, "test", "rules", "monitoring_alerts_test.yml"],
                 [promtool, "check", "config", "prometheus.yml"]):
        done = subprocess.run(argv, capture_output=True, text=True, cwd=RULES.parent, timeout=120)
        assert done.returncode == 0, f"{' '.join(argv[1:])}:\n{done.stdout}\n{done.stderr}"
