"""`triage run --queue` and `triage queue ...`: the offline path fills the review queue (a rerun
adds nothing), and a person can watch it and work it from the shell. Oracle: the decisions file
itself (its escalated ids) and the queue's own API."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from engine_fixtures import one_torch_thread  # noqa: F401  (autouse)
from hitl_triage.serve.queue import open_queue
from test_cli import cells, number, run_cli


@pytest.fixture(scope="module")
def queued(tmp_path_factory):
    d = tmp_path_factory.mktemp("queue-cli")
    fleet = d / "fleet.parquet"
    assert run_cli("simulate", "--rows", 6000, "--out", fleet, "--calibration-rows", 4000, "--bank-rows", 1000,
                   "--dim", 16, "--sources", 3, "--seed", 9)[0] == 0
    assert run_cli("fit", "--calibration", d / "fleet.calibration.parquet", "--bank", d / "fleet.bank.parquet",
                   "--out", d / "profile", "--budget", 0.2)[0] == 0
    # The fleet sends an extra column (where the original input lives): it must reach the reviewer.
    table = pq.read_table(fleet)
    table = table.append_column("uri", pc.binary_join_element_wise("file:///inputs/", table.column("id").cast(pa.string()), ".png", ""))
    with_uri = d / "fleet-uri.parquet"
    pq.write_table(table, with_uri)
    url = f"sqlite:///{d / 'review.db'}"
    code, first = run_cli("run", "--profile", d / "profile", with_uri, "--out", d / "decisions.parquet",
                          "--queue", url, "--batch-rows", 2500)
    assert code == 0
    code, second = run_cli("run", "--profile", d / "profile", with_uri, "--out", d / "again.parquet", "--queue", url)
    assert code == 0
    return d, url, first, second


def test_run_enqueues_every_escalated_row_once(queued):
    d, url, first, second = queued
    decisions = pq.read_table(d / "decisions.parquet")
    escalated = decisions.filter(decisions.column("escalate"))
    assert 0 < escalated.num_rows < decisions.num_rows
    flat = lambda text: " ".join(text.split())  # noqa: E731  (rich wraps long lines)
    assert f"{escalated.num_rows:,} new items" in flat(first) and ": 0 new items" in flat(second)
    with open_queue(url) as queue:
        tiers = queue.stats()["tiers"]
        assert sum(t["depth"] for t in tiers.values()) == escalated.num_rows
        for tier in tiers:
            expected = escalated.filter(pc.equal(escalated.column("tier"), tier))
            assert tiers[tier]["depth"] == expected.num_rows, tier


def test_queue_commands_show_and_work_the_queue(queued):
    d, url, _, _ = queued
    decisions = pq.read_table(d / "decisions.parquet")
    general = decisions.filter(pc.and_(decisions.column("escalate"), pc.equal(decisions.column("tier"), "general")))
    code, text = run_cli("queue", "stats", url)
    assert code == 0 and number(cells(text)["general"]) == general.num_rows

    code, text = run_cli("queue", "claim", url, "--tier", "general", "--reviewer", "alice", "-n", 3)
    assert code == 0
    claimed = {k: v.replace(" ", "") for k, v in cells(text).items()}  # folded cells joined back
    # The three most urgent items of the tier, highest priority first, with their input's uri.
    top = general.sort_by([("priority", "descending")]).slice(0, 3)
    for item_id in top.column("id").to_pylist():
        assert str(item_id) in claimed, (item_id, text)
        assert f"file:///inputs/{item_id}.png" in claimed[str(item_id)]

    item_id = str(top.column("id")[0].as_py())
    code, text = run_cli("queue", "verdict", url, item_id, "--action", "confirm", "--reviewer", "alice")
    assert code == 0 and "item done" in text
    code, text = run_cli("queue", "verdict", url, item_id, "--action", "confirm", "--reviewer", "alice")
    assert code == 0 and "already stored" in text
    code, text = run_cli("queue", "verdict", url, "no-such-id", "--action", "confirm", "--reviewer", "alice")
    assert code == 2
    code, text = run_cli("queue", "stats", url)
    assert number(cells(text)["general"].split("│")[1]) == 2  # two still leased to alice

    out = d / "verdicts.parquet"
    code, text = run_cli("queue", "export", url, "--out", out)
    assert code == 0
    verdicts = pq.read_table(out)
    assert verdicts.column("id").to_pylist() == [item_id] and verdicts.column("action").to_pylist() == ["confirm"]
    assert verdicts.column("audit_weight").type == pa.float32()
    code, text = run_cli("queue", "requeue", url, "--dead-letter")
    assert code == 0 and "0 dead-lettered" in text
