"""`triage export`: every verdict as a labelled example with its provenance and the final label
after adjudication, on both queue backends (SQLite and a real redis-server started here).

Oracle: each item gets a review script drawn at random (agree, disagree then adjudicate, escalate
then rule out of scope, leave half done...), and the final answer each script must end in is
written out by hand below from the queue's documented rule (base.py's module docstring): two
agreeing verdicts settle an overlap item, two disagreeing ones send it to the adjudicator, whose
verdict is final; an escalation moves it one tier up. Provenance is compared with the decision and
prediction tables that were enqueued."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hitl_triage.serve.export import METADATA_KEY, training_examples
from hitl_triage.serve.queue import QueueError, QueueOptions, open_queue

from queue_fixtures import decision_batch, queue_url, redis_url  # noqa: F401  (fixtures)
from test_cli import run_cli

# Reason bits as DESIGN.md names them (restated, not imported).
BIT_NAMES = {1: "confidence", 2: "disagreement", 4: "policy", 8: "anomaly", 16: "audit", 32: "reported"}
OPTIONS = {"overlap": {"general": 1.0}, "keep_embedding": True}  # every general item needs two reviewers


def fleet_batch(rng, rows: int):
    """Decisions and predictions with an embedding and a model_version the fleet sends."""
    decisions, predictions = decision_batch(rng, rows, escalate_share=0.6)
    embedding = rng.normal(size=(rows, 5)).astype(np.float32)
    predictions = predictions.append_column(
        "embedding", pa.FixedSizeListArray.from_arrays(pa.array(embedding.reshape(-1)), 5))
    predictions = predictions.append_column("model_version", pa.array([f"m-{i % 2}" for i in range(rows)]))
    # decided by a server under online budget control: the step names the thresholds
    decisions = decisions.append_column("budget_step", pa.array(rng.integers(0, 3, rows).astype(np.uint32)))
    return decisions, predictions


def review_scripts(rng, items: list[dict]):
    """Per item, the verdicts to submit (in rounds) and the final (state, action, label) the
    documented rule gives them, with the index of the decisive verdict."""
    scripts = {}
    for item in items:
        i, tier, pred, c = item["id"], item["tier"], item["predicted_class"], item["classes"]
        other = (pred + 1 + int(rng.integers(c - 1))) % c  # a class other than the prediction
        if tier == "general":
            kind = rng.choice(["confirm", "correct", "disagree", "escalate", "half", "untouched"])
            g = lambda r, a, lab=-1: {"id": i, "reviewer": r, "tier": "general", "action": a, "label": lab}  # noqa: E731
            if kind == "confirm":
                verdicts, final = [g("g1", "confirm"), g("g2", "confirm", pred)], ("done", "confirm", pred, 1)
            elif kind == "correct":
                verdicts, final = [g("g1", "correct", other), g("g2", "correct", other)], ("done", "correct", other, 1)
            elif kind == "disagree":  # the adjudicator's verdict is final, whatever it is
                last = int(rng.integers(c))
                action = "confirm" if last == pred else "correct"
                verdicts = [g("g1", "confirm"), g("g2", "correct", other),
                            {"id": i, "reviewer": "a1", "tier": "adjudicator", "action": action, "label": last}]
                final = ("done", action, last, 2)
            elif kind == "escalate":
                verdicts = [g("g1", "escalate"),
                            {"id": i, "reviewer": "s1", "tier": "specialist", "action": "out_of_scope", "label": -1}]
                final = ("done", "out_of_scope", -1, 1)
            elif kind == "half":
                verdicts, final = [g("g1", "correct", other)], ("open", None, None, None)
            else:
                verdicts, final = [], ("open", None, None, None)
        else:  # specialist: one review settles it
            if rng.random() < 0.5:
                verdicts = [{"id": i, "reviewer": "s1", "tier": "specialist", "action": "correct", "label": other}]
                final = ("done", "correct", other, 0)
            else:
                verdicts = [{"id": i, "reviewer": "s1", "tier": "specialist", "action": "escalate", "label": -1},
                            {"id": i, "reviewer": "a1", "tier": "adjudicator", "action": "confirm", "label": -1}]
                final = ("done", "confirm", pred, 1)
        scripts[i] = (verdicts, final)
    return scripts


def test_every_verdict_becomes_an_example_with_provenance_and_final_label(queue_url, rng, tmp_path):
    decisions, predictions = fleet_batch(rng, 240)
    decided = {r["id"]: r for r in decisions.to_pylist()}
    predicted = {r["id"]: r for r in predictions.to_pylist()}
    with open_queue(queue_url, QueueOptions(**OPTIONS)) as queue:
        queue.enqueue(decisions, predictions)
        items = [{"id": i, "tier": d["tier"], "predicted_class": d["predicted_class"], "classes": 4}
                 for i, d in decided.items() if d["escalate"]]
        scripts = review_scripts(rng, items)
        rounds = max(len(v) for v, _ in scripts.values())
        for r in range(rounds):  # first verdicts of every item, then the second ones...
            batch = [v[r] for v, _ in scripts.values() if len(v) > r]
            if batch:
                queue.submit(batch)
            if r == 0:
                queue.submit(batch[:5])  # a retried submission: stored once, exported once
        examples = training_examples(queue)

    submitted = [v for verdicts, _ in scripts.values() for v in verdicts]
    assert examples.num_rows == len(submitted)
    rows = examples.to_pylist()
    seen = {(r["id"], r["tier"], r["reviewer"]) for r in rows}
    assert seen == {(v["id"], v["tier"], v["reviewer"]) for v in submitted}
    for row in rows:
        d, p = decided[row["id"]], predicted[row["id"]]
        for name in ("source", "profile_version", "audit_weight", "reason_mask", "predicted_class", "priority",
                     "confidence", "audit_stratum", "budget_step"):
            assert row[name] == d[name], name
        assert row["decision_tier"] == d["tier"]
        assert row["model_version"] == p["model_version"] and row["uri"] == p["uri"]
        assert row["logits"] == p["logits"] and row["embedding"] == p["embedding"]
        assert row["reasons"] == [name for bit, name in BIT_NAMES.items() if d["reason_mask"] & bit]
        assert row["ts"] is not None and row["stored_at"] is not None
        state, action, label, decisive = scripts[row["id"]][1]
        assert (row["final_state"], row["final_action"], row["final_label"]) == (state, action, label), row["id"]
    decisive_rows = {(r["id"], r["reviewer"]) for r in rows if r["decisive"]}
    expected = {(i, v[f[3]]["reviewer"]) for i, (v, f) in scripts.items() if f[0] == "done"}
    assert decisive_rows == expected
    kinds = {f[1] for _, f in scripts.values()}
    assert {"confirm", "correct", "out_of_scope", None} <= kinds  # the draw exercised every outcome

    # The command line writes the same table (both entry points), metadata included.
    out, again = tmp_path / "labels.parquet", tmp_path / "again.parquet"
    config = tmp_path / "triage.toml"
    config.write_text('[queue]\nkeep_embedding = true\noverlap = { general = 1.0 }\n')
    assert run_cli("export", "--queue", queue_url, "--config", config, "--out", out)[0] == 0
    assert run_cli("queue", "--config", config, "export", queue_url, "--out", again)[0] == 0
    for path in (out, again):
        written = pq.read_table(path)
        assert written.drop_columns([]).to_pylist() == rows
        assert b'"format": 1' in written.schema.metadata[METADATA_KEY]


def test_since_keeps_the_final_label_from_every_verdict(queue_url, rng):
    decisions, predictions = fleet_batch(rng, 80)
    with open_queue(queue_url, QueueOptions(**OPTIONS)) as queue:
        queue.enqueue(decisions, predictions)
        general = [r["id"] for r in decisions.to_pylist() if r["escalate"] and r["tier"] == "general"]
        queue.submit([{"id": i, "reviewer": "g1", "tier": "general", "action": "confirm"} for i in general])
        cut = max(queue.verdicts().column("stored_at").cast(pa.int64()).to_pylist()) / 1e6
        queue.submit([{"id": i, "reviewer": "g2", "tier": "general", "action": "confirm"} for i in general[:3]])
        later = training_examples(queue, since=cut)
    assert sorted(later.column("id").to_pylist()) == sorted(general[:3])
    assert set(later.column("reviewer").to_pylist()) == {"g2"}
    assert set(later.column("final_state").to_pylist()) == {"done"}  # settled by g1 and g2 together


def test_options_other_than_the_queue_was_worked_under_are_refused_by_id(queue_url, rng, capsys, tmp_path):
    decisions, predictions = fleet_batch(rng, 60)
    with open_queue(queue_url, QueueOptions(**OPTIONS)) as queue:
        queue.enqueue(decisions, predictions)
        first = next(r["id"] for r in decisions.to_pylist() if r["escalate"] and r["tier"] == "general")
        queue.submit([{"id": first, "reviewer": r, "tier": "general", "action": "confirm"} for r in ("g1", "g2")])
    with open_queue(queue_url) as queue:  # no overlap: the replay finds the item done after one verdict
        with pytest.raises(QueueError, match=rf"id '{first}'.*tier: expected .*--config"):
            training_examples(queue)
    code, _ = run_cli("export", "--queue", queue_url, "--out", "/dev/null")
    assert code == 2 and "--out /dev/null: expected a file to write" in capsys.readouterr().err
    missing = tmp_path / "typo.db"  # a mistyped queue is refused, not read as "no verdicts" (nor created)
    assert run_cli("export", "--queue", f"sqlite:///{missing}", "--out", tmp_path / "x.parquet")[0] == 2
    assert f"expected an existing review queue, found no file at {missing}" in capsys.readouterr().err
    assert not missing.exists()
