"""One escalation rule: the trigger rates `triage fit` reports are the rates `triage run` produces.

`triage fit` chooses thresholds on its holdout rows and reports the share of them each reason bit
fires on. Triaging exactly those rows with `triage run` must fire the same bits on the same rows,
with per-category confidence floors, mandatory categories, per-source temperatures and rows
without an embedding in the data. The holdout rows are found independently of the engine: the
split hash restated with the ``xxhash`` package (tests/engine_fixtures.py).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomllib

from hitl_triage.serve.cli import main

from engine_fixtures import BITS, audit_uniform_np, column, fleet_tables

SPLIT_SEED = 0x7E57_5EED  # engine/fit.py's documented split seed, restated
HOLDOUT = 0.5

CONFIG = """
[calibration]
per_source = true
min_rows_per_source = 500
holdout = 0.5
[thresholds]
mode = "{mode}"
[policy]
mandatory_categories = ["medical"]
category_min_confidence = {{ legal = 0.97 }}
on_missing_embedding = "escalate"
[audit]
base_rate = 0.05
"""


@pytest.fixture(scope="module")
def calibration_with_gaps():
    """The simulated calibration rows, with the embedding of every 37th row missing."""
    _, _, calibration, bank = fleet_tables(2000, calibration_rows=8000, bank_rows=3000)
    embedding = calibration.column("embedding").combine_chunks()
    missing = np.arange(calibration.num_rows) % 37 == 0
    gapped = pa.FixedSizeListArray.from_arrays(
        embedding.values.slice(embedding.offset * embedding.type.list_size), embedding.type.list_size,
        mask=pa.array(missing),
    )
    calibration = calibration.set_column(calibration.schema.get_field_index("embedding"), "embedding", gapped)
    return calibration, bank, missing


@pytest.mark.parametrize("mode", ["budget", "target_risk"])
def test_fit_rates_are_the_run_rates_on_the_same_rows(mode, calibration_with_gaps, tmp_path):
    calibration, bank, missing = calibration_with_gaps
    pq.write_table(calibration, tmp_path / "calib.parquet")
    pq.write_table(bank, tmp_path / "bank.parquet")
    (tmp_path / "triage.toml").write_text(CONFIG.format(mode=mode))
    assert main(["fit", "--calibration", str(tmp_path / "calib.parquet"), "--bank", str(tmp_path / "bank.parquet"),
                 "--out", str(tmp_path / "profile"), "--config", str(tmp_path / "triage.toml")]) == 0

    ids = column(calibration, "id")
    holdout = audit_uniform_np(ids)(SPLIT_SEED) < HOLDOUT
    assert holdout.sum() > 2000 and (holdout & missing).any()
    pq.write_table(calibration.filter(pa.array(holdout)).drop_columns(["label"]), tmp_path / "holdout.parquet")
    assert main(["run", "--profile", str(tmp_path / "profile"), str(tmp_path / "holdout.parquet"),
                 "--out", str(tmp_path / "decisions.parquet")]) == 0

    decisions = pq.read_table(tmp_path / "decisions.parquet")
    mask = column(decisions, "reason_mask").astype(np.int64)
    fit = tomllib.loads((tmp_path / "profile" / "profile.toml").read_text())["fit"]
    expected = fit["expected_rates"]
    assert expected["rows"] == decisions.num_rows
    for name in ("confidence", "disagreement", "policy", "anomaly", "audit"):
        run_rate = float(np.mean((mask & BITS[name]) > 0))
        assert expected[name] == run_rate, (mode, name, expected[name], run_rate)
    model = BITS["confidence"] | BITS["disagreement"] | BITS["anomaly"]
    assert expected["union_before_policy_and_audit"] == float(np.mean((mask & model) > 0))
    assert expected["with_audit"] == float(np.mean(mask > 0))
    # The floors and the missing embeddings did take part.
    category = column(decisions, "category")
    legal = category == "legal"
    confidence = column(decisions, "confidence")
    assert ((mask[legal] & BITS["confidence"]) > 0).sum() == (confidence[legal] < np.float32(0.97)).sum() > 0
    gaps = missing[holdout]
    assert ((mask[gaps] & BITS["anomaly"]) > 0).all()
