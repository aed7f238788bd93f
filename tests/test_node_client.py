"""A fleet written in JavaScript calls triage.v1 (issue 22, item 5).

tests/node/triage_client.mjs loads serve/proto/triage/v1/triage.proto at run time with
@grpc/proto-loader, builds the prediction batches with apache-arrow (logits as nested fixed-size
lists, from numbers handed over as JSON), calls ``Triage`` and ``TriageStream`` with
@grpc/grpc-js and a bearer token, and decodes the Arrow decisions with apache-arrow. The oracle:
the same rows sent by the project's Python client (``TriageClient``, over triage.v1 and over
Flight) to the same server; every decision column must be equal, bit for bit (floats included:
float32 values travel exactly through JSON as doubles). A wrong token gets UNAUTHENTICATED with
the server's message; the trailing metadata names the process that answered.

The npm packages are pinned (tests/node/package.json, package-lock.json) and installed with
``npm ci`` once into a cache directory named after the lock file's hash
(``~/.cache/hitl-triage/node-<hash>``, or under ``$XDG_CACHE_HOME``). Skipped, with a message,
only where ``node`` is absent.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from engine_fixtures import contract_table, known_ensemble, one_torch_thread  # noqa: F401  (autouse)
from test_service_ops import TOKENS, profile_dir, serving  # noqa: F401  (profile_dir: a fixture)
from tool_cache import built_once

NODE_DIR = Path(__file__).resolve().parent / "node"
PROTO = Path(__file__).resolve().parent.parent / "serve" / "proto" / "triage" / "v1" / "triage.proto"
INSTALL_TIMEOUT_S = 600
M, C = 3, 4
SIZES = (1, 257, 1000)  # one row, an odd size, a round one


def node_modules() -> Path:
    """The cache directory holding tests/node's pinned packages (installed by ``npm ci`` when
    missing) and, copied there, the client script (Node resolves ES-module imports from the
    script's own directory upwards)."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the Node.js client of triage.v1 is not tested")
    npm = shutil.which("npm")
    assert npm is not None, "node is installed but npm is not: expected npm to install tests/node's packages"
    lock = (NODE_DIR / "package-lock.json").read_bytes()
    name = f"node-{hashlib.sha256(lock + (NODE_DIR / 'package.json').read_bytes()).hexdigest()[:16]}"

    def install(home: Path) -> str:
        home.mkdir()
        for file in ("package.json", "package-lock.json"):
            shutil.copy(NODE_DIR / file, home / file)
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=home,
                              capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        assert done.returncode == 0, f"npm ci in {home} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        return done.stdout[-500:]

    home = built_once(name, install)
    shutil.copy(NODE_DIR / "triage_client.mjs", home / "triage_client.mjs")
    return home


def rows(n: int, seed: int) -> tuple[pa.Table, dict]:
    """n predictions as a pyarrow table and as the JSON the script builds its batch from (the
    first row's logits hold NaN and ±inf when n > 1: an unscoreable row, escalated)."""
    logits, _, _ = known_ensemble(np.random.default_rng(seed), n, members=M, classes=C)
    if n > 1:
        logits[0, 0, :3] = (np.nan, np.inf, -np.inf)
    ids = [f"node-{seed}-{i}" for i in range(n)]
    sources = [f"camera-{i % 4}" for i in range(n)]
    as_json = [[[z if math.isfinite(z) else str(z).replace("inf", "Infinity").replace("nan", "NaN")
                 for z in member] for member in row] for row in logits.astype(np.float32).tolist()]
    return contract_table(ids, logits, source=sources), {"id": ids, "logits": as_json, "source": sources}


def as_json_values(column: pa.ChunkedArray | pa.Array) -> list:
    """A column as the script writes it: NaN as "NaN", int64 as strings, null as None."""
    out = []
    for v in column.to_pylist():
        if isinstance(v, float) and math.isnan(v):
            v = "NaN"
        elif isinstance(v, int) and not isinstance(v, bool) and pa.types.is_int64(column.type):
            v = str(v)
        out.append(v)
    return out


def compare(node: dict, python: pa.Table, what: str) -> list[str]:
    wrong = []
    if [name for name, _ in node["schema"]] != python.schema.names:
        return [f"{what}: columns {[n for n, _ in node['schema']]} != {python.schema.names}"]
    for name in python.schema.names:
        expected, got = as_json_values(python.column(name)), node["columns"][name]
        if expected != got:
            first = next(i for i, (a, b) in enumerate(zip(expected, got)) if a != b)
            wrong.append(f"{what}: column {name!r} differs at row {first}: python {expected[first]!r}, node {got[first]!r}")
    return wrong


def test_node_client_gets_the_python_clients_decisions(profile_dir, tmp_path):  # noqa: F811
    from hitl_triage.serve.client import TriageClient

    home = node_modules()
    fleet_token = next(t for t, r in TOKENS.items() if r == "fleet")
    batches = [rows(n, seed) for seed, n in enumerate(SIZES)]
    with serving(profile_dir, None, tmp_path, "--flight-port", "0", config={"tokens": TOKENS}) as server:
        inputs = tmp_path / "node-input.json"
        inputs.write_text(json.dumps({"token": fleet_token, "batches": [b for _, b in batches]}))
        output = tmp_path / "node-output.json"
        done = subprocess.run(["node", str(home / "triage_client.mjs"), server.grpc, str(PROTO), str(inputs),
                               str(output)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"node failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        node = json.loads(output.read_text())
        with TriageClient(server.grpc, token=fleet_token, transport="grpc") as grpc_client, \
                TriageClient(f"127.0.0.1:{server.ports['flight']}", token=fleet_token) as flight_client:
            python = [grpc_client.triage(table) for table, _ in batches]
            flight = [flight_client.triage(table) for table, _ in batches]
    wrong = []
    for k, (answer, expected, over_flight) in enumerate(zip(node["unary"], python, flight)):
        assert "error" not in answer, answer
        assert (answer["rows"], answer["escalated"]) == (expected.num_rows, sum(expected.column("escalate").to_pylist()))
        assert answer["trailing"]["x-triage-worker-pid"] == str(server.ports["pid"])
        wrong += compare(answer, expected, f"batch {k} (Triage)")
        wrong += compare(answer, over_flight, f"batch {k} (Triage against Flight)")
    wrong += compare(node["stream"][0], python[0], "batch 0 (TriageStream)")
    assert not wrong, "\n".join(wrong)
    # The unscoreable row was escalated, not silently accepted; JavaScript read it as Python did.
    assert node["unary"][1]["columns"]["escalate"][0] is True and node["unary"][1]["columns"]["valid"][0] is False
    assert node["wrong_token"]["code"] == "UNAUTHENTICATED"
    assert "expected a token listed in serve.tokens" in node["wrong_token"]["details"]
