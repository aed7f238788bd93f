"""Prometheus metrics of `triage serve` (issue 22, item 4), read back through a real Prometheus.

The test starts a `prometheus` server (Debian's package; skipped with a message where the binary
is absent) on a free loopback port, scraping a `triage serve` subprocess (port 0, metrics port 0)
every second, with the repository's alert rules loaded. Rows go in through triage.v1 (Triage and
Report, three sources), one call is refused. Oracles: the decisions the calls answered (rows,
escalations by tier and source, reason bits counted in numpy) and the review queue read
directly (depth per tier), compared with PromQL results from Prometheus' HTTP API. Every query of
the Grafana dashboard and every alert expression runs there without error, the dashboard's
queries return series, and both name only metrics the service exports; promtool checks the rules and
runs their unit tests (deploy/prometheus/alerts_test.yml) where it is present.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest

from engine_fixtures import one_torch_thread  # noqa: F401  (autouse)
from hitl_triage.serve.proto.triage.v1 import triage_pb2, triage_pb2_grpc
from hitl_triage.serve.queue import open_queue
from hitl_triage.serve.service.ipc import read_batch
from service_fixtures import scrape
from test_service_ops import channel_to, fresh_queue, predictions, profile_dir, request, serving  # noqa: F401  (profile_dir: a fixture)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "triage.json"
REASON_BITS = {"confidence": 1, "disagreement": 2, "policy": 4, "anomaly": 8, "audit": 16, "reported": 32,
               "known_edge_case": 64}  # DESIGN.md's table, restated
WAIT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus); the metrics are checked "
                    "against a real Prometheus server")
    return binary


class Prometheus:
    """A Prometheus server scraping ``targets`` every second, with ``rules`` loaded."""

    def __init__(self, workdir: Path, targets: list[str], rules: Path):
        binary = prometheus_binary()
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "hitl-triage", "static_configs": [{"targets": targets}]}],
        }))
        self.log = open(workdir / "prometheus.log", "w")
        self.process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                pytest.fail(f"prometheus did not become ready: {(workdir / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                body = json.loads(answer.read())
        except urllib.error.HTTPError as exc:  # a bad query answers 400 with the error in the body
            body = json.loads(exc.read())
        assert body["status"] == "success", f"{path} {params}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        return self.api("query", query=promql)["result"]

    def value(self, promql: str) -> dict[tuple, float]:
        """The instant vector of ``promql`` as {label values (sorted by label name): value}."""
        return {tuple(v for _, v in sorted(r["metric"].items())): float(r["value"][1]) for r in self.query(promql)}

    def until(self, promql: str, expected, timeout: float = WAIT_S):
        """Poll until ``promql`` gives ``expected`` (scrapes every second); the last answer."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.value(promql)
            if got == expected or time.monotonic() > deadline:
                return got
            time.sleep(0.5)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()


@pytest.fixture(scope="module")
def world(profile_dir, tmp_path_factory):  # noqa: F811
    """(server, its queue's url, prometheus, the decisions answered, triage rows sent, report rows sent)."""
    d = tmp_path_factory.mktemp("metrics")
    prometheus_binary()  # or skip, saying why, before a server is started
    queue_url = fresh_queue(d)
    with serving(profile_dir, queue_url, d, "--metrics-port", "0") as server:
        prometheus = Prometheus(d, [f"127.0.0.1:{server.ports['metrics']}"], ALERTS)
        try:
            channel = channel_to(server)
            stub = triage_pb2_grpc.TriageStub(channel)
            decided = [read_batch(stub.Triage(request(predictions(n, prefix=f"m{i}", seed=i)), timeout=60).arrow_ipc)
                       for i, n in enumerate((1000, 2500, 333, 4096))]
            reported = read_batch(stub.Report(request(predictions(50, prefix="rep", seed=99)), timeout=60).arrow_ipc)
            with pytest.raises(grpc.RpcError):
                stub.Triage(triage_pb2.TriageRequest(arrow_ipc=b"not arrow"), timeout=60)
            yield server, queue_url, prometheus, pa.Table.from_batches(decided + [reported]), 1000 + 2500 + 333 + 4096, 50
        finally:
            prometheus.close()


def test_prometheus_counts_the_rows_sent(world):
    server, queue_url, prometheus, decisions, rows, reported = world
    got = prometheus.until("sum(hitl_triage_rows_total)", {(): float(rows + reported)})
    assert got == {(): float(rows + reported)}, f"Prometheus says {got}, {rows + reported} rows were sent"


def test_escalations_by_tier_source_and_reason_match_the_decisions(world):
    server, queue_url, prometheus, decisions, rows, reported = world
    total_rows = float(rows + reported)
    prometheus.until("sum(hitl_triage_rows_total)", {(): total_rows})
    escalated = decisions.filter(decisions.column("escalate"))
    pairs = list(zip(escalated.column("source").to_pylist(), escalated.column("tier").to_pylist()))
    expected = {pair: float(pairs.count(pair)) for pair in set(pairs)}
    assert prometheus.value("sum by (source, tier) (hitl_triage_escalations_total)") == expected
    masks = escalated.column("reason_mask").to_numpy().astype(np.int64)
    expected_reasons = {(name,): float(np.count_nonzero(masks & bit)) for name, bit in REASON_BITS.items()
                        if np.count_nonzero(masks & bit)}
    assert expected_reasons[("reported",)] == reported
    assert prometheus.value("sum by (reason) (hitl_triage_escalation_reasons_total)") == expected_reasons


def test_queue_depth_refused_calls_and_histograms(world):
    server, queue_url, prometheus, decisions, rows, reported = world
    with open_queue(queue_url) as queue:
        depth = {(tier,): float(entry["depth"]) for tier, entry in queue.stats()["tiers"].items()}
    assert sum(depth.values()) == pc_sum(decisions.column("escalate"))
    assert prometheus.until("max by (tier) (hitl_triage_review_queue_depth)", depth) == depth
    assert prometheus.value('sum by (code) (hitl_triage_rejected_calls_total{code="INVALID_ARGUMENT"})') == \
        {("INVALID_ARGUMENT",): 1.0}
    # Histograms: counts as many as the calls and batches, quantiles that PromQL can take.
    assert prometheus.value('sum(hitl_triage_request_seconds_count{face="triage.v1"})') == {(): 6.0}
    # Five calls one after the other: five engine batches.
    assert prometheus.value("sum(hitl_triage_batch_rows_count)") == {(): 5.0}
    assert prometheus.value("sum(hitl_triage_batch_rows_sum)") == {(): float(rows + reported)}
    assert prometheus.value("sum(hitl_triage_batcher_queue_seconds_count)") == {(): 5.0}
    for histogram in ("hitl_triage_request_seconds", "hitl_triage_batcher_queue_seconds", "hitl_triage_batch_rows"):
        p99 = prometheus.value(f"histogram_quantile(0.99, sum by (le) ({histogram}_bucket))")[()]
        assert np.isfinite(p99) and p99 > 0, histogram


def pc_sum(column) -> float:
    return float(np.count_nonzero(column.to_numpy(zero_copy_only=False)))


def metric_names(text: str) -> set[str]:
    return set(re.findall(r"\bhitl_triage_[a-z_]+", text))


def test_dashboard_and_alert_rules_run_on_prometheus_and_name_exported_metrics(world):
    server, queue_url, prometheus, decisions, rows, reported = world
    prometheus.until("sum(hitl_triage_rows_total)", {(): float(rows + reported)})
    exported = {name for name, _ in scrape(server.ports["metrics"])}
    dashboard = json.loads(DASHBOARD.read_text())
    targets = [(panel["title"], t["expr"]) for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(targets) >= 10
    alerts_text = ALERTS.read_text()
    unknown = (metric_names(DASHBOARD.read_text()) | metric_names(alerts_text)) - exported
    assert not unknown, f"the dashboard or the alert rules name metrics the service does not export: {sorted(unknown)}"
    # rate() needs two scrapes in its window: give it a few.
    time.sleep(3)
    empty = []
    for title, expr in targets:
        promql = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        if not prometheus.query(promql):
            empty.append(f"{title}: {promql}")
    assert not empty, "dashboard queries without data after traffic:\n" + "\n".join(empty)
    # The rules are loaded and evaluate without error (none fires on this traffic).
    deadline = time.monotonic() + WAIT_S
    while True:
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        if rules and all(r["health"] == "ok" for r in rules) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(rules) == alerts_text.count("- alert:"), rules
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r["health"], r.get("lastError")) for r in rules]
    assert not [r["name"] for r in rules if r["state"] == "firing"]


def test_promtool_checks_and_unit_tests_the_alert_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    for argv in ([promtool, "check", "rules", str(ALERTS)], [promtool, "test", "rules", "alerts_test.yml"],
                 [promtool, "check", "config", "prometheus.yml"]):
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ALERTS.parent, timeout=120)
        assert done.returncode == 0, f"{' '.join(argv[1:])}:\n{done.stdout}\n{done.stderr}"


def test_source_labels_are_capped():
    """A fleet with more sources than MAX_SOURCES adds no labels past it: the rest count as "other"."""
    from hitl_triage.serve.service.metrics import MAX_SOURCES, Metrics

    metrics = Metrics()
    n = MAX_SOURCES + 44
    decisions = pa.record_batch({"escalate": pa.array([True] * n), "reason_mask": pa.array([1] * n, pa.uint8()),
                                 "tier": pa.array(["general"] * n), "source": pa.array([f"s{i:04d}" for i in range(n)])})
    metrics.decided(decisions)
    metrics.decided(decisions)  # the same sources again: those that have a label keep it
    samples = {s.labels["source"]: s.value for family in metrics.registry.collect()
               if family.name == "hitl_triage_escalations" for s in family.samples if s.name.endswith("_total")}
    assert len(samples) == MAX_SOURCES + 1
    assert samples["other"] == 2 * 44 and all(v == 2 for k, v in samples.items() if k != "other")
    assert sum(samples.values()) == 2 * n
