"""`triage demo --loop`: the loop through one running server (issue 17 item 5). Checked against
the files it leaves and an in-process engine: the first stretch decided by the first version,
the second by the next one (the server reloaded it without a restart, and decided as the engine
does in process), every figure of the before/after table recomputed from the decision files."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hitl_triage.engine.engine import TriageEngine
from hitl_triage.engine.profile import Profile
from hitl_triage.serve.cli import main
from hitl_triage.serve.queue import open_queue
from hitl_triage.serve.report import fmt_rate

from test_cli import cells, number

ROWS = 8_000
MODEL_BITS, KNOWN_EDGE_CASE = 1 | 2 | 8 | 64, 64  # DESIGN.md's bits, restated


@pytest.mark.slow
def test_demo_loop_reloads_the_next_version_and_reports_what_changed(tmp_path, capsys):
    assert main(["demo", "--rows", str(ROWS), "--loop", "--reviewer-error", "0.05", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = cells(out[out.index("The loop: before and after"):])
    first, second = Profile.load(tmp_path / "profile"), Profile.load(tmp_path / "profile.g2")
    assert second.generation == 2 and second.parent == first.version
    before = pq.read_table(tmp_path / "decisions.parquet")
    after = pq.read_table(tmp_path / "decisions.after.parquet")
    assert before.num_rows == after.num_rows == ROWS
    assert set(before.column("profile_version").to_pylist()) == {first.version}
    assert set(after.column("profile_version").to_pylist()) == {second.version}  # reloaded, not restarted
    stretch2 = pq.read_table(tmp_path / "stretch2.parquet")
    in_process = TriageEngine(second, device="cpu").triage(stretch2)
    for name in ("reason_mask", "tier", "priority", "audit_weight"):
        assert after.column(name).equals(pa.Table.from_batches([in_process]).column(name)), name

    rates = [fmt_rate(float(((t.column("reason_mask").to_numpy() & MODEL_BITS) > 0).mean())) for t in (before, after)]
    first_cell, second_cell = table["escalation rate"].split(" │ ")
    assert first_cell.startswith(rates[0]) and second_cell.startswith(rates[1])
    known = int(((after.column("reason_mask").to_numpy() & KNOWN_EDGE_CASE) > 0).sum())
    assert f"{known:,} escalations added" in table["watch list"]
    assert f"{second.bank.ntotal:,} rows" in table["bank"] and second.bank.ntotal > first.bank.ntotal
    with open_queue(f"sqlite:///{tmp_path / 'review.db'}") as queue:
        verdicts = queue.verdicts()
        first_ids = set(before.filter(before.column("escalate")).column("id").to_pylist())
        # Every item of the first stretch was reviewed (the crew worked the queue dry); the second
        # stretch's escalations wait in the queue.
        assert first_ids <= set(verdicts.column("id").to_pylist())
        assert number(table["reviewed"]) == verdicts.num_rows
        waiting = sum(t["depth"] for t in queue.stats()["tiers"].values())
    assert waiting == int(np.sum(after.column("escalate").to_numpy(zero_copy_only=False)))
    assert (tmp_path / "profile.g2" / "FEEDBACK.md").is_file()
