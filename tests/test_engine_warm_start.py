"""No cold start on the first batch: building a TriageEngine prepares every kernel a batch calls.

The IVF scan's numba compile (about 10 s cold on two cores, 0.2 s from numba's disk cache) used
to land on the first batch of a profile with an IVF bank. The check is by compile calls, not by
time: in a fresh interpreter (so no earlier test has compiled anything) every call of numba's
``Dispatcher.compile`` (a compile, or a load from the disk cache, of a signature a dispatcher
does not hold yet) is counted; constructing the engine may make them, the first ``triage`` must
make none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from engine_fixtures import contract_table, known_ensemble, one_torch_thread  # noqa: F401  (autouse)
from hitl_triage.engine.config import TriageConfig
from hitl_triage.engine.profile import Profile

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import pyarrow as pa
    from numba.core import dispatcher

    compiles = []
    real_compile = dispatcher.Dispatcher.compile

    def counting_compile(self, sig):
        compiles.append(self.py_func.__qualname__)
        return real_compile(self, sig)

    dispatcher.Dispatcher.compile = counting_compile

    from hitl_triage.engine.engine import TriageEngine
    from hitl_triage.engine.profile import Profile
    from hitl_triage.kernels.knn import ivf_cpu

    profile = Profile.load(sys.argv[1])
    batch = pa.ipc.open_file(sys.argv[2]).read_all()
    scan_before = len(ivf_cpu._ivf_sweep.signatures) + len(ivf_cpu._ivf_sweep_heads.signatures)
    loaded = len(compiles)
    engine = TriageEngine(profile, device="cpu")
    prepared = compiles[loaded:]
    scan_after = len(ivf_cpu._ivf_sweep.signatures) + len(ivf_cpu._ivf_sweep_heads.signatures)
    del compiles[:]
    decisions = engine.triage(batch)
    print(json.dumps({"kind": profile.bank.kind, "scan_before": scan_before, "scan_after": scan_after,
                      "prepared": prepared, "first_batch": list(compiles), "rows": decisions.num_rows,
                      "ood_finite": int(np.isfinite(decisions.column("ood_score").to_numpy(zero_copy_only=False)).sum())}))
    """
)


def embeddings(rng, rows: int, centres: np.ndarray) -> np.ndarray:
    """Gaussian clusters around unit centres (what an encoder's in-distribution rows look like)."""
    picked = centres[rng.integers(0, len(centres), rows)]
    return (picked + rng.standard_normal(picked.shape) * (0.6 / np.sqrt(centres.shape[1]))).astype(np.float32)


@pytest.mark.parametrize("index", ["ivf", "flat"])
def test_first_batch_compiles_nothing(index, rng, tmp_path):
    import pyarrow as pa

    centres = rng.standard_normal((8, 16))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    logits, labels, _ = known_ensemble(rng, 3000, members=3, classes=4)
    calibration = contract_table(np.arange(3000), logits, embedding=embeddings(rng, 3000, centres), label=labels)
    config = TriageConfig.from_dict({"bank": {"k": 5, "index": index}})
    profile = Profile.fit(calibration, bank=embeddings(rng, 4000, centres), config=config)
    assert profile.bank.kind == index
    directory = profile.save(tmp_path / "profile")
    batch_path = tmp_path / "batch.arrow"
    batch = contract_table(np.arange(5000, 7000), known_ensemble(rng, 2000, members=3, classes=4)[0],
                           embedding=embeddings(rng, 2000, centres))
    with pa.OSFile(str(batch_path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_table(batch)

    env = dict(os.environ, HITL_TRIAGE_KNN_BACKEND="")  # the automatic choice, as a server makes it
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(directory), str(batch_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kind"] == index and result["rows"] == 2000 and result["ood_finite"] > 0
    assert result["first_batch"] == [], f"the first batch compiled {result['first_batch']} (prepared: {result['prepared']})"
    if index == "ivf":
        # Not vacuous: the scan was not compiled before the engine was built, and was after.
        assert result["scan_before"] == 0 and result["scan_after"] >= 1, result
