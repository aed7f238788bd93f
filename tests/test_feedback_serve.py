"""`triage serve` with `[serve] feedback_every_s`: a real server on free loopback ports makes the
next version from the verdicts in its queue, writes it beside the serving one and decides with it,
without a restart."""

from __future__ import annotations

import time

import pytest

from hitl_triage.engine.config import ConfigError
from hitl_triage.engine.profile import Profile
from hitl_triage.serve.client import TriageClient, local_server
from hitl_triage.serve.service.config import ServeConfig

import feedback_fixtures as ff


def test_scheduled_feedback_makes_and_serves_the_next_version(tmp_path):
    calibration, bank, fleet, truth = ff.world()
    profile = ff.fitted_profile(calibration, bank)
    reviewed, fresh = ff.halves(fleet)
    reviewed_truth, _ = ff.halves(truth)
    ff.reviewed_round(profile, reviewed, reviewed_truth, tmp_path / "queue.db")  # verdicts wait in the queue
    profile_dir = profile.save(tmp_path / "profile")
    config = tmp_path / "triage.toml"
    config.write_text("[serve]\nfeedback_every_s = 0.2\n[queue]\nkeep_embedding = true\nblind_audit = false\n")
    with local_server(profile_dir, f"sqlite:///{tmp_path / 'queue.db'}", args=("--config", str(config))) as server, \
            TriageClient(server.flight) as client:
        deadline = time.monotonic() + 120
        while client.profile()["version"] == profile.version and time.monotonic() < deadline:
            time.sleep(0.2)
        served = client.profile()["version"]
        decisions = client.triage(fresh.slice(0, 500))
    new = Profile.load(tmp_path / "profile.g2")
    assert served == new.version != profile.version and new.parent == profile.version
    assert set(decisions.column("profile_version").to_pylist()) == {new.version}
    assert (tmp_path / "profile.g2" / "FEEDBACK.md").is_file()
    assert not (tmp_path / "profile.g3").exists()  # no new verdicts since: no further round


def test_scheduled_feedback_is_refused_with_several_workers():
    with pytest.raises(ConfigError, match="serve.feedback_every_s: expected workers = 1"):
        ServeConfig(feedback_every_s=60, workers=2).check()
    with pytest.raises(ConfigError, match="serve.feedback_every_s: expected seconds >= 0"):
        ServeConfig(feedback_every_s=-1).check()
