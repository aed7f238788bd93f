"""The `triage` command line: simulate -> fit -> run, the files and the printed summaries agree;
`--budget` / `--target-risk` choose the mode; a wrong input fails before writing anything;
`triage demo` end to end (issue 3, item 7; issue 9 asks for the demo check).

Everything goes through ``hitl_triage.serve.cli.main([...])`` in a temporary directory. The
summaries are rich tables; :func:`cells` reads them back (wrapped cells joined), and every count
printed is compared with the same count computed from the decisions file with numpy.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine_fixtures import (  # noqa: F401  (one_torch_thread: an autouse fixture)
    BITS,
    DESIGN_COLUMNS,
    column,
    one_torch_thread,
)
from hitl_triage.engine.engine import TriageEngine
from hitl_triage.engine.profile import Profile
from hitl_triage.serve.cli import main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROWS = 20_000


def cells(text: str) -> dict[str, str]:
    """First cell -> the rest of the row, for every body row of every rich table in ``text``
    (a wrapped cell's continuation lines, whose first cell is blank, are joined with a space)."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        parts = [p.strip() for p in line.strip().strip("│").split("│")]
        if parts[0] or not rows:
            rows.append(parts)
        else:
            rows[-1] = [(a + " " + b).strip() for a, b in zip(rows[-1], parts)]
    return {row[0]: " │ ".join(row[1:]) for row in rows}


def number(text: str) -> int:
    """The first integer in ``text`` (thousands separators allowed)."""
    return int(re.search(r"\d[\d,]*", text).group().replace(",", ""))


def run_cli(*argv) -> tuple[int, str]:
    """main(argv) with stdout captured (for module-scoped fixtures, where capsys is not allowed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    fleet = d / "fleet.parquet"
    code, _ = run_cli("simulate", "--rows", ROWS, "--out", fleet, "--calibration-rows", 8000, "--bank-rows", 2000,
                      "--dim", 32, "--sources", 4, "--row-group-rows", 6000, "--seed", 5)
    assert code == 0
    code, fit_text = run_cli("fit", "--calibration", d / "fleet.calibration.parquet",
                             "--bank", d / "fleet.bank.parquet", "--out", d / "profile")
    assert code == 0
    # 7000-row batches against 6000-row row groups: batches straddle row groups.
    code, run_text = run_cli("run", "--profile", d / "profile", fleet, "--out", d / "decisions.parquet",
                             "--batch-rows", 7000)
    assert code == 0
    return {"dir": d, "fleet": fleet, "fit_text": fit_text, "run_text": run_text,
            "decisions": pq.read_table(d / "decisions.parquet"), "profile": Profile.load(d / "profile")}


def test_decisions_file_has_one_row_per_input_row_in_order_with_the_design_columns(pipeline):
    decisions = pipeline["decisions"]
    fleet = pq.read_table(pipeline["fleet"])
    assert decisions.num_rows == fleet.num_rows == ROWS
    assert column(decisions, "id").tolist() == column(fleet, "id").tolist()
    for name, kind in DESIGN_COLUMNS.items():
        assert decisions.schema.field(name).type == kind, name
    assert decisions.schema.field("id").type == fleet.schema.field("id").type
    assert column(decisions, "source").tolist() == column(fleet, "source").tolist()
    assert set(column(decisions, "profile_version")) == {pipeline["profile"].version}

    # Streaming in row groups decides exactly as one in-process batch would.
    whole = TriageEngine(pipeline["profile"], device="cpu").triage(fleet)
    for name in ("escalate", "reason_mask", "tier", "predicted_class", "audit_weight", "confidence"):
        assert column(whole, name).tolist() == column(decisions, name).tolist(), name
    # k-NN distances may move in the last bits with the batch's other rows (FAISS blocks).
    np.testing.assert_allclose(column(whole, "ood_score"), column(decisions, "ood_score"), atol=1e-6)


def test_run_summary_matches_the_decisions_file(pipeline):
    table = cells(pipeline["run_text"])
    decisions = pipeline["decisions"]
    mask = column(decisions, "reason_mask")
    escalate = column(decisions, "escalate")
    assert number(table["rows"]) == decisions.num_rows
    assert number(table["escalated"]) == int(escalate.sum())
    assert number(table["invalid (escalated)"]) == int((~column(decisions, "valid")).sum())
    assert number(table["audit samples"]) == int(((mask & BITS["audit"]) > 0).sum())
    for reason, bit in BITS.items():
        assert number(table[reason]) == int(((mask & bit) > 0).sum()), reason
    tiers = column(decisions, "tier")
    for tier in set(t for t in tiers if t is not None):
        assert number(table[tier]) == sum(t == tier for t in tiers), tier
    source = column(decisions, "source")
    for name in set(source):
        rows, escalated = [number(x) for x in table[name].split("│")[:2]]
        assert (rows, escalated) == ((source == name).sum(), (escalate & (source == name)).sum()), name
    assert "predictions/s" in pipeline["run_text"]


def test_fit_prints_what_it_fitted(pipeline):
    table = cells(pipeline["fit_text"])
    profile = pipeline["profile"]
    report = profile.fit_report["calibration"]
    assert table["temperature"] == f"{profile.temperature:.4f}"
    assert table["ECE (holdout)"] == f"{report['holdout_before']['ece']:.4f} -> {report['holdout_after']['ece']:.4f}"
    assert f"confidence < {profile.thresholds.confidence:.4f}" in table["thresholds"]
    assert f"k-NN distance > {profile.thresholds.ood:.4f} (k={profile.k})" in table["thresholds"]
    expected = profile.fit_report["expected_rates"]["union_before_policy_and_audit"]
    assert table["expected escalation"].startswith(f"{100 * expected:.1f}%")
    assert f"Profile {profile.version}" in pipeline["fit_text"]


def test_budget_and_target_risk_flags_set_the_mode(pipeline, tmp_path, capsys):
    d = pipeline["dir"]
    common = ["fit", "--calibration", str(d / "fleet.calibration.parquet"), "--bank", str(d / "fleet.bank.parquet")]
    assert main([*common, "--out", str(tmp_path / "budget"), "--budget", "0.2"]) == 0
    budget_text = capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "risk"), "--target-risk", "0.05"]) == 0
    risk_text = capsys.readouterr().out

    budget = tomllib.loads((tmp_path / "budget" / "profile.toml").read_text())
    risk = tomllib.loads((tmp_path / "risk" / "profile.toml").read_text())
    assert budget["config"]["thresholds"]["mode"] == "budget" and budget["config"]["thresholds"]["budget"] == 0.2
    assert risk["config"]["thresholds"]["mode"] == "target_risk" and risk["config"]["thresholds"]["target_risk"] == 0.05
    assert budget["fit"]["thresholds"]["mode"] == "budget" and risk["fit"]["thresholds"]["mode"] == "target_risk"
    # Budget mode aims the union of the triggers at b on the threshold rows (~4k of them, so
    # ties and the discrete quantiles move it by well under a point).
    assert budget["fit"]["expected_rates"]["union_before_policy_and_audit"] == pytest.approx(0.2, abs=0.01)
    assert risk["fit"]["thresholds"]["risk_bound"] <= 0.05
    assert "risk guarantee" in risk_text and "risk guarantee" not in budget_text

    with pytest.raises(SystemExit) as exit_info:  # argparse: the two modes exclude each other
        main([*common, "--out", str(tmp_path / "both"), "--budget", "0.2", "--target-risk", "0.05"])
    assert exit_info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err
    assert not (tmp_path / "both").exists()


def _fails_without_writing(argv, output, capsys, *needles):
    """Run ``argv``; it must exit 2 with one line on stderr naming ``needles`` (no traceback), and
    leave neither the output nor its partial file behind."""
    code = main([str(a) for a in argv])
    message = capsys.readouterr().err
    assert code == 2 and "Traceback" not in message, (code, message)
    for needle in needles:
        assert needle in message, (needle, message)
    assert not output.exists()
    assert not output.with_name(output.name + ".partial").exists()


def test_a_wrong_input_fails_before_writing(pipeline, tmp_path, capsys):
    profile_dir = pipeline["dir"] / "profile"
    out = tmp_path / "decisions.parquet"

    # Another model's file: C = 7 where the profile has C = 10.
    code, _ = run_cli("simulate", "--rows", 300, "--out", tmp_path / "other.parquet", "--classes", 7, "--dim", 32,
                      "--calibration-rows", 0, "--bank-rows", 0)
    assert code == 0
    _fails_without_writing(["run", "--profile", profile_dir, tmp_path / "other.parquet", "--out", out], out, capsys,
                           "logits", "C=10", "C=7")

    # A file without the embedding the profile's bank needs; the good file first, so nothing is
    # written even when the bad one comes second.
    fleet = pq.read_table(pipeline["fleet"]).slice(0, 100)
    pq.write_table(fleet.drop_columns(["embedding"]), tmp_path / "no_embedding.parquet")
    _fails_without_writing(["run", "--profile", profile_dir, pipeline["fleet"], tmp_path / "no_embedding.parquet",
                            "--out", out], out, capsys, "embedding")

    # A file that is not there.
    _fails_without_writing(["run", "--profile", profile_dir, tmp_path / "absent.parquet", "--out", out], out, capsys,
                           "absent.parquet")


@pytest.mark.parametrize("path", ["service", "offline"])
def test_demo_summary_matches_its_decisions_file(path, tmp_path, capsys):
    assert main(["demo", "--rows", str(ROWS), "--out", str(tmp_path), *(["--offline"] if path == "offline" else [])]) == 0
    table = cells(capsys.readouterr().out)
    decisions = pq.read_table(tmp_path / "decisions.parquet")
    assert decisions.num_rows == ROWS
    mask = column(decisions, "reason_mask")
    escalate = column(decisions, "escalate")
    match = re.fullmatch(r"([\d,]+) of ([\d,]+) predictions \(.*\)", table["escalated"])
    assert match, table["escalated"]
    assert (number(match.group(1)), number(match.group(2))) == (int(escalate.sum()), ROWS)
    by_reason = {name: number(count) for name, count in re.findall(r"(\w+) ([\d,]+)", table["by reason"])}
    assert by_reason == {reason: int(((mask & bit) > 0).sum()) for reason, bit in BITS.items()}
    by_tier = {name: number(count) for name, count in re.findall(r"(\w+) ([\d,]+)", table["by tier"])}
    tiers = column(decisions, "tier")
    assert by_tier == {t: sum(x == t for x in tiers) for t in set(tiers) if t is not None}
    assert number(table["audit sample"]) == int(((mask & BITS["audit"]) > 0).sum())
    profile = Profile.load(tmp_path / "profile")
    assert profile.version in table["profile"]
    assert set(column(decisions, "profile_version")) == {profile.version}
    # The demo's policy makes "legal" mandatory: POLICY rows are exactly the legal rows.
    category = column(decisions, "category")
    np.testing.assert_array_equal((mask & BITS["policy"]) > 0, category == "legal")
    if path == "service":
        # Through the service, every escalated row waits in the review queue, in its tier.
        from hitl_triage.serve.queue import open_queue

        url = f"sqlite:///{(tmp_path / 'review.db').resolve()}"
        assert "review.db" in table["review queue"].replace(" ", "")  # rich folds long cells
        shown = {name: number(count) for name, count in re.findall(r"(\w+) ([\d,]+)", table["review queue"])}
        # The report's simulated reviewers have worked part of the queue since the table was
        # printed: every item is still there, open or reviewed.
        with open_queue(url) as queue:
            held = {tier: sum(entry[k] for k in ("depth", "in_flight", "done", "dead"))
                    for tier, entry in queue.stats()["tiers"].items()}
        assert {tier: n for tier, n in held.items() if n} == by_tier == shown
        # And the service decided as the engine does in process.
        from hitl_triage.engine.engine import TriageEngine

        fleet = pq.read_table(tmp_path / "fleet.parquet")
        in_process = pa.Table.from_batches([TriageEngine(profile, device="cpu").triage(fleet)])
        for name in ("reason_mask", "tier", "priority", "confidence", "ood_score", "audit_weight"):
            assert decisions.column(name).equals(in_process.column(name)), name
    # It ends with the monitoring report, named in the table.
    report = tmp_path / "report.html"
    assert "report.html" in table["report"].replace(" ", "")
    assert report.stat().st_size > 10_000 and "<svg" in report.read_text()


def test_fit_reads_a_config_file_and_flags_override_its_mode(pipeline, tmp_path, capsys):
    d = pipeline["dir"]
    (tmp_path / "triage.toml").write_text(
        '[thresholds]\nmode = "target_risk"\ntarget_risk = 0.1\n\n'
        '[policy]\nmandatory_categories = ["legal"]\n\n'
        '[audit]\nbase_rate = 0.05\nstrata = ["source"]\n'
    )
    common = ["fit", "--calibration", str(d / "fleet.calibration.parquet"), "--config", str(tmp_path / "triage.toml")]
    assert main([*common, "--out", str(tmp_path / "p"), "--budget", "0.15"]) == 0
    capsys.readouterr()
    config = tomllib.loads((tmp_path / "p" / "profile.toml").read_text())["config"]
    assert config["thresholds"]["mode"] == "budget" and config["thresholds"]["budget"] == 0.15
    assert config["policy"]["mandatory_categories"] == ["legal"]
    assert config["audit"]["base_rate"] == 0.05 and config["audit"]["strata"] == ["source"]
    assert not (tmp_path / "p" / "bank").exists()  # no --bank: no bank, no anomaly trigger

    (tmp_path / "typo.toml").write_text("[audit]\nbase_rat = 0.05\n")
    code = main(["fit", "--calibration", str(d / "fleet.calibration.parquet"), "--config", str(tmp_path / "typo.toml"),
                  "--out", str(tmp_path / "q")])
    assert code == 2, "a configuration error exits 2 with one line, not a traceback"
    assert re.search(r"triage fit: audit: unknown key 'base_rat'", capsys.readouterr().err)
    assert not (tmp_path / "q").exists()


def test_run_keeps_input_order_across_files(pipeline, tmp_path, capsys):
    fleet = pq.read_table(pipeline["fleet"])
    pq.write_table(fleet.slice(3000, 1000), tmp_path / "a.parquet", row_group_size=300)
    pq.write_table(fleet.slice(0, 2500), tmp_path / "b.parquet")
    out = tmp_path / "decisions.parquet"
    assert main(["run", "--profile", str(pipeline["dir"] / "profile"), str(tmp_path / "a.parquet"),
                 str(tmp_path / "b.parquet"), "--out", str(out), "--batch-rows", "700"]) == 0
    assert number(cells(capsys.readouterr().out)["rows"]) == 3500
    decisions = pq.read_table(out)
    expected = column(fleet, "id")[3000:4000].tolist() + column(fleet, "id")[:2500].tolist()
    assert column(decisions, "id").tolist() == expected
    single = pipeline["decisions"]
    assert column(decisions, "reason_mask")[1000:].tolist() == column(single, "reason_mask")[:2500].tolist()
