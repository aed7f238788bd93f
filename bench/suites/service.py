"""service: the triage service end to end on loopback, against the in-process engine of the same run.

The server is ``triage serve`` in a subprocess (``client.local_server``: free ports, a fresh
SQLite review queue in a temporary directory, WAL and synchronous=FULL, so every escalation is
fsynced before its decisions come back); the clients run in this process. Both share the
machine's cores, as a fleet's sidecar and the server would on one host. Every timed pass sends
rows under ids the queue has not seen (renamed copies made before the clock starts), so each pass
pays the queue's inserts; a first, small batch warms the server up untimed. The server runs with
``OMP_NUM_THREADS`` = the run's ``--threads``, the torch threads of the in-process rows.

Rows:

- ``no bank, 64k-row batches``: the fleet simulator's rows without embeddings and a default
  budget-mode profile without a bank (M=5, C=10):
  - ``in-process engine``: ``TriageEngine.triage`` on the same batches, one after another: the
    baseline of the issue's ratios (>= 0.7 wanted, and >= 1M rows/s);
  - ``in-process service``: ``Service.decide`` from two threads, batcher and queue writer
    included, no transport: what any face can reach at most with this queue;
  - ``SQLite enqueue alone``: the queue's ``enqueue_many`` of the same decisions, one batch per
    write; rows/s whose escalations it stores (items/s in ``quality``): the queue's own bound;
  - ``Flight, SQLite queue``: ``TriageClient.triage_stream`` over 2 concurrent exchanges;
  - ``Flight, no queue``: the same against a server without a queue (transport + engine only);
  - ``Flight echo (transport alone)``: the same client and rows against ``bench/flight_echo.py``,
    a Flight server answering each batch with precomputed decisions of its size: what moving the
    rows in and the decisions out costs on this machine, the bound of any Flight face.
  The Flight rows' ``parts_in_turn_rps`` is 1 / (1/engine + 1/echo [+ 1/enqueue]): the rate the
  parts measured alone predict when they take turns on the same cores (a row pays each part's
  cost). The in-process engine is measured before and after the other rows; the better counts.
- ``bank 100k, 64k-row batches``: D=128, the profile ``Profile.fit`` makes from a 100k bank
  (IVF); in-process engine and Flight with the SQLite queue (>= 0.9 wanted: k-NN dominates).
- ``8k-row batches``: ``triage.v1`` unary ``Triage`` (one call a batch), ``TriageStream`` (4
  batches in flight) and Flight (one exchange, 4 in flight), each from one client.
- ``64 clients x 64 rows``: 64 threads, each with its own Flight connection and one long-lived
  exchange, sending one 64-row batch and waiting for its decisions, again and again for a fixed
  time; the server's batcher on (``max_delay_ms`` default 2, ``max_batch_rows`` 65536) and off
  (``max_batch_rows`` 64: one engine batch per request). rows/s, p50 and p99 latency.
- ``--workers``: Flight at 64k rows over 4 exchanges to ``--workers 2`` (each worker its own
  Flight port: Flight turns SO_REUSEPORT off, the client spreads its exchanges over the ports)
  against ``--workers 1``, SQLite queue shared.
"""

from __future__ import annotations

import contextlib
import importlib.util
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ..factories import fleet_data
from ..report import Row
from ..runner import NotAvailableYet
from .common import failure

SUITE = "service"
TABLE_QUALITY = ("escalated", "items_per_s", "parts_in_turn_rps", "streams", "requests", "p50_ms", "p99_ms", "max_delay_ms", "workers")
TABLE_HIDE = ("dtype", "compile s")
BIG, SMALL = 65_536, 8_192        # rows a batch: the large-batch and the triage.v1 cases
CLIENTS, CLIENT_ROWS = 64, 64     # the small-request case: clients, rows a request


def run(ctx) -> None:
    import torch

    if importlib.util.find_spec("hitl_triage.serve.client") is None:
        raise NotAvailableYet("hitl_triage.serve.client (the Flight face's client and local_server)")

    rows = 4 * BIG if ctx.quick else 16 * BIG
    bank_rows_sent = 2 * BIG if ctx.quick else 8 * BIG
    repeats = 2 if ctx.quick else 3
    seconds_64 = 4.0 if ctx.quick else 10.0
    env = {"OMP_NUM_THREADS": str(ctx.threads)}
    ctx.note(f"client and server on this machine's {ctx.threads} threads (torch threads {torch.get_num_threads()} "
             f"in this process, OMP_NUM_THREADS={ctx.threads} in the servers); best of {repeats} passes, fresh ids each")
    task = ctx.task(SUITE, total=7)
    with tempfile.TemporaryDirectory(prefix="hitl-bench-service-") as tmp:
        tmp = Path(tmp)
        ctx.progress.update(task, description=f"{SUITE}: simulating {rows:,} rows and fitting a profile without a bank")
        plain = _world(tmp / "plain", rows, bank_rows=0, dim=16, seed=ctx.seed + 61, embedding=False)
        ctx.note(f"no bank: {rows:,} fleet rows ({plain.bytes_per_row:.0f} bytes a row on the wire), "
                 f"{plain.escalated:.1%} escalated by the default budget profile")
        ctx.advance(task)
        _big_batches(ctx, task, tmp, plain, repeats, env)
        _small_batches(ctx, task, tmp, plain, repeats, env)
        _many_clients(ctx, task, tmp, plain, seconds_64, env)
        _workers(ctx, task, tmp, plain, repeats, env)
        ctx.progress.update(task, description=f"{SUITE}: fitting a profile on a 100k bank (D=128)")
        banked = _world(tmp / "bank", bank_rows_sent, bank_rows=100_000, dim=128, seed=ctx.seed + 67, embedding=True)
        ctx.note(f"bank 100k: {bank_rows_sent:,} rows sent, index {banked.index}, {banked.escalated:.1%} escalated")
        ctx.advance(task)
        _bank(ctx, task, tmp, banked, repeats, env)
    ctx.progress.remove_task(task)


# -- data ----------------------------------------------------------------------------------------


class _World:
    """Fleet rows, a saved profile and its engine, and the decisions' escalated share."""

    def __init__(self, directory: Path, table, profile, engine):
        self.directory = directory
        self.table = table
        self.profile_dir = directory / "profile"
        self.engine = engine
        self.index = profile.bank.kind if profile.bank is not None else "none"
        self.bytes_per_row = table.nbytes / max(table.num_rows, 1)
        sample = engine.triage(table.slice(0, min(table.num_rows, BIG)).combine_chunks().to_batches()[0])
        self.escalated = float(np.mean(sample.column("escalate").to_numpy(zero_copy_only=False)))
        self._copies = 0

    def fresh(self, tag: str = ""):
        """The rows under ids no earlier pass used."""
        import pyarrow as pa
        import pyarrow.compute as pc

        self._copies += 1
        ids = pc.binary_join_element_wise(f"{tag}{self._copies}-", self.table.column("id").cast(pa.string()), "")
        return self.table.set_column(self.table.schema.get_field_index("id"), "id", ids)

    def queue_url(self, name: str) -> str:
        return f"sqlite:///{self.directory / (name + '.db')}"


def _world(directory: Path, rows: int, *, bank_rows: int, dim: int, seed: int, embedding: bool) -> _World:
    from hitl_triage.engine.config import TriageConfig
    from hitl_triage.engine.engine import TriageEngine
    from hitl_triage.engine.profile import Profile

    directory.mkdir(parents=True)
    data = fleet_data(rows, bank_rows=bank_rows, calibration_rows=20_000, dim=dim, seed=seed)
    table = data.fleet if embedding else data.fleet.drop_columns(["embedding"])
    calibration = data.calibration if embedding else data.calibration.drop_columns(["embedding"])
    profile = Profile.fit(calibration, bank=data.bank if bank_rows else None, config=TriageConfig())
    profile.save(directory / "profile")
    profile = Profile.load(directory / "profile")
    return _World(directory, table.combine_chunks(), profile, TriageEngine(profile, device="cpu"))


# -- measuring -----------------------------------------------------------------------------------


def _passes(repeats: int, one_pass) -> tuple[float, float]:
    """(best, median) seconds of ``repeats`` calls of ``one_pass()``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def _flight_pass(addresses, table, *, batch_rows: int, streams: int) -> int:
    from hitl_triage.serve.client import TriageClient

    with TriageClient(addresses, batch_rows=batch_rows) as client:
        return sum(d.num_rows for d in client.triage_stream([table], streams=streams))


def _warm(addresses, world: _World, transport: str = "flight") -> None:
    from hitl_triage.serve.client import TriageClient

    with TriageClient(addresses, transport=transport) as client:
        client.triage(world.fresh("warm-").slice(0, 4096))


@contextlib.contextmanager
def _server(world: _World, name: str, env: dict, *args: str, queue: bool = True):
    from hitl_triage.serve.client import local_server

    with local_server(world.profile_dir, world.queue_url(name) if queue else None, args=args,
                      directory=world.directory, env=env) as server:
        yield server


@contextlib.contextmanager
def _echo_server(tmp: Path, reply):
    """bench/flight_echo.py in a subprocess answering with ``reply``'s rows; yields its address."""
    import json
    import subprocess
    import sys

    import pyarrow.ipc as ipc

    reply_path, ready = tmp / "echo-reply.arrow", tmp / f"echo-ready-{time.monotonic_ns()}.json"
    with ipc.new_file(reply_path, reply.schema) as out:
        out.write_batch(reply)
    process = subprocess.Popen([sys.executable, "-m", "bench.flight_echo", str(reply_path), str(ready)],
                               cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bench.flight_echo: expected it serving, found exit status {process.poll()}")
            time.sleep(0.05)
        yield f"127.0.0.1:{json.loads(ready.read_text())['flight']}"
    finally:
        process.kill()
        process.wait()


def _add_failed(ctx, case: str, implementations, exc: BaseException) -> None:
    for implementation in implementations:
        ctx.add(Row(SUITE, case, implementation, status=failure(exc)))


# -- the cases -----------------------------------------------------------------------------------


def _big_batches(ctx, task, tmp: Path, world: _World, repeats: int, env: dict) -> None:
    """The large-batch rows. The in-process engine is measured before the other rows and again
    after them, and the ratios use the better of the two, so that a burst of load on this shared
    machine during either measurement cannot flatter the service's ratios."""
    from hitl_triage.serve.commands.queue import open_from_args
    from hitl_triage.serve.service.config import ServeConfig
    from hitl_triage.serve.service.server import Service

    case, n = "no bank, 64k-row batches", world.table.num_rows
    sizes = {"rows": n, "batch_rows": BIG}
    batches = world.table.to_batches(max_chunksize=BIG)
    measured: dict[str, tuple[float, float]] = {}  # name -> (best, median) seconds
    failed: dict[str, BaseException] = {}

    def engine_passes() -> tuple[float, float]:
        world.engine.triage(batches[0])
        return _passes(repeats, lambda: [world.engine.triage(b) for b in batches])

    ctx.progress.update(task, description=f"{SUITE}: {case}, in process")
    engine_before = engine_passes()

    # The queue alone: enqueue_many of these decisions under fresh ids, one batch a write.
    copies = [world.fresh("q-") for _ in range(repeats)]
    pairs = [[(world.engine.triage(b), b) for b in c.to_batches(max_chunksize=BIG)] for c in copies]
    items = int(sum(d.column("escalate").to_numpy(zero_copy_only=False).sum() for d, _ in pairs[0]))
    with open_from_args(world.queue_url("alone"), None, tiers=world.engine.profile.config.tiers.order) as queue:
        measured["SQLite enqueue alone"] = _passes(repeats, lambda: [queue.enqueue_many([p]) for p in pairs.pop()])

    service = Service.start(world.profile_dir, world.queue_url("in-process"), ServeConfig(port=0, flight_port=-1, metrics_port=-1))
    try:
        copies = [world.fresh("s-") for _ in range(repeats)]

        def decide_pass() -> None:
            parts = copies.pop().to_batches(max_chunksize=BIG)
            threads = [threading.Thread(target=lambda p=parts[i::2]: [service.decide(b) for b in p]) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        measured["in-process service"] = _passes(repeats, decide_pass)
    finally:
        service.stop()
    ctx.advance(task)

    # The transport's own bound: the same client and rows against a Flight server that does no
    # work but answer each batch with decisions of its size.
    echo = "Flight echo (transport alone)"
    ctx.progress.update(task, description=f"{SUITE}: {case}, {echo}")
    try:
        with _echo_server(tmp, world.engine.triage(batches[0])) as address:
            copies = [world.fresh("e-") for _ in range(repeats)]
            _flight_pass(address, world.fresh("warm-e-").slice(0, 4096), batch_rows=BIG, streams=1)
            measured[echo] = _passes(repeats, lambda: _flight_pass(address, copies.pop(), batch_rows=BIG, streams=2))
    except Exception as exc:  # noqa: BLE001 - reported in the row
        failed[echo] = exc

    for name, queue in (("Flight, SQLite queue", True), ("Flight, no queue", False)):
        ctx.progress.update(task, description=f"{SUITE}: {case}, {name}")
        try:
            with _server(world, f"big-{int(queue)}", env, queue=queue) as server:
                _warm(server.flight, world)
                copies = [world.fresh("f-") for _ in range(repeats)]
                measured[name] = _passes(repeats, lambda: _flight_pass(server.flight, copies.pop(), batch_rows=BIG, streams=2))
        except Exception as exc:  # noqa: BLE001 - reported in the row
            failed[name] = exc

    ctx.progress.update(task, description=f"{SUITE}: {case}, in process again")
    engine_after = engine_passes()
    best, median = min(engine_before, engine_after)
    engine_rps = n / best
    ctx.add(Row(SUITE, case, "in-process engine", sizes, unit="rows/s", throughput=engine_rps, seconds=best,
                median_s=median, repeats=2 * repeats, quality={"escalated": world.escalated},
                notes=f"best of the passes before ({n / engine_before[0]:,.0f} rows/s) and after "
                      f"({n / engine_after[0]:,.0f} rows/s) the other rows"))
    rps = {name: n / times[0] for name, times in measured.items()}
    # Where the parts take turns on the same cores, their costs a row add up: this is the rate the
    # parts measured alone predict for the whole (the service's bound on this machine).
    parts = {"Flight, SQLite queue": (echo, "SQLite enqueue alone"), "Flight, no queue": (echo,)}
    notes = {
        "SQLite enqueue alone": "rows whose escalations the queue stores per second, one enqueue_many a batch",
        "in-process service": "Service.decide from 2 threads: batcher and SQLite queue writer, no transport",
        echo: "bench/flight_echo.py: answers each batch with precomputed decisions, no engine, no queue",
    }
    for name in ("SQLite enqueue alone", "in-process service", echo, "Flight, SQLite queue", "Flight, no queue"):
        if name in failed:
            _add_failed(ctx, case, [name], failed[name])
            continue
        if name not in measured:
            continue
        best, median = measured[name]
        ratios = {"vs in-process engine": rps[name] / engine_rps}
        quality: dict = {}
        if name == "SQLite enqueue alone":
            quality = {"items_per_s": items / best, "escalated": world.escalated}
        elif name in parts:
            quality = {"streams": 2, "escalated": world.escalated if "SQLite" in name else None}
            if echo in rps:
                ratios["vs Flight echo"] = rps[name] / rps[echo]
            if all(p in rps for p in parts[name]):
                quality["parts_in_turn_rps"] = 1.0 / (1.0 / engine_rps + sum(1.0 / rps[p] for p in parts[name]))
        elif name == echo:
            quality = {"streams": 2}
        ctx.add(Row(SUITE, case, name, sizes, unit="rows/s", throughput=rps[name], seconds=best, median_s=median,
                    repeats=repeats, ratios=ratios, quality=quality, notes=notes.get(name, "")))
    ctx.advance(task)


def _small_batches(ctx, task, tmp: Path, world: _World, repeats: int, env: dict) -> None:
    from hitl_triage.serve.client import TriageClient

    case, n = "8k-row batches", world.table.num_rows
    ctx.progress.update(task, description=f"{SUITE}: {case}, Flight and triage.v1")
    try:
        with _server(world, "small", env) as server:
            _warm(server.flight, world)
            _warm(server.grpc, world, "grpc")
            results = {}

            def unary(table) -> None:
                with TriageClient(server.grpc, transport="grpc") as client:
                    for batch in table.to_batches(max_chunksize=SMALL):
                        client.triage(batch)

            def stream(table) -> None:
                with TriageClient(server.grpc, transport="grpc", batch_rows=SMALL) as client:
                    for _ in client.triage_stream([table], streams=1):
                        pass

            for name, fn in (("Flight", lambda t: _flight_pass(server.flight, t, batch_rows=SMALL, streams=1)),
                             ("triage.v1 unary", unary), ("triage.v1 stream", stream)):
                copies = [world.fresh("s8-") for _ in range(repeats)]
                results[name] = _passes(repeats, lambda: fn(copies.pop()))
    except Exception as exc:  # noqa: BLE001 - reported in the rows
        _add_failed(ctx, case, ("Flight", "triage.v1 unary", "triage.v1 stream"), exc)
        ctx.advance(task)
        return
    flight_best = results["Flight"][0]
    for name, (best, median) in results.items():
        ctx.add(Row(SUITE, case, name, {"rows": n, "batch_rows": SMALL}, unit="rows/s", throughput=n / best, seconds=best,
                    median_s=median, repeats=repeats, ratios={} if name == "Flight" else {"vs Flight": flight_best / best},
                    quality={"streams": 1}))
    ctx.advance(task)


def _many_clients(ctx, task, tmp: Path, world: _World, seconds: float, env: dict) -> None:
    case = f"{CLIENTS} clients x {CLIENT_ROWS} rows"
    results = {}
    for name, args in (("batcher on", ()), ("batcher off", ("--max-batch-rows", str(CLIENT_ROWS)))):
        ctx.progress.update(task, description=f"{SUITE}: {case}, {name}")
        try:
            with _server(world, f"clients-{name[-2:].strip()}", env, *args) as server:
                _warm(server.flight, world)
                results[name] = _clients(server.flight, world, seconds)
        except Exception as exc:  # noqa: BLE001 - reported in the row
            _add_failed(ctx, case, [name], exc)
    off = results.get("batcher off")
    for name, (rows, elapsed, latencies) in results.items():
        ratios = {"vs batcher off": (rows / elapsed) / (off[0] / off[1])} if name == "batcher on" and off else {}
        ctx.add(Row(SUITE, case, name, {"clients": CLIENTS, "request_rows": CLIENT_ROWS}, unit="rows/s",
                    throughput=rows / elapsed, seconds=elapsed, repeats=1, ratios=ratios,
                    quality={"requests": len(latencies), "p50_ms": float(np.percentile(latencies, 50)) * 1e3,
                             "p99_ms": float(np.percentile(latencies, 99)) * 1e3,
                             "max_delay_ms": 2.0 if name == "batcher on" else None},
                    notes="each client: one long-lived Flight exchange, one 64-row batch at a time"))
    ctx.advance(task)


def _clients(address: str, world: _World, seconds: float):
    """(rows decided, seconds, per-request latencies) of CLIENTS threads
    sending CLIENT_ROWS-row batches one at a time for ``seconds``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.flight as flight

    base = world.table.slice(0, CLIENTS * CLIENT_ROWS).combine_chunks()
    ids = base.column("id").cast(pa.string()).chunk(0)
    id_index = base.schema.get_field_index("id")
    start, stop = threading.Barrier(CLIENTS + 1), threading.Event()
    latencies: list[list[float]] = [[] for _ in range(CLIENTS)]
    errors: list[BaseException] = []
    def client(k: int) -> None:
        template = base.slice(k * CLIENT_ROWS, CLIENT_ROWS).to_batches()[0]
        mine = ids.slice(k * CLIENT_ROWS, CLIENT_ROWS)
        connection = flight.connect(f"grpc+tcp://{address}")
        writer, reader = connection.do_exchange(flight.FlightDescriptor.for_command(b"triage"))
        def request(r: int) -> pa.RecordBatch:
            return template.set_column(id_index, "id", pc.binary_join_element_wise(f"c{k}-{r}-", mine, ""))

        try:
            writer.begin(request(0).schema)
            start.wait()
            r = 0
            while not stop.is_set():
                batch = request(r)
                t0 = time.perf_counter()
                writer.write_batch(batch)
                reader.read_chunk()
                latencies[k].append(time.perf_counter() - t0)
                r += 1
            writer.done_writing()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)
            with contextlib.suppress(BaseException):
                start.abort()
        finally:
            with contextlib.suppress(Exception):
                writer.close()
            connection.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    done = [x for per in latencies for x in per]
    return len(done) * CLIENT_ROWS, elapsed, np.asarray(done)


def _workers(ctx, task, tmp: Path, world: _World, repeats: int, env: dict) -> None:
    case, n = "--workers, 64k-row batches", world.table.num_rows
    results = {}
    for workers in (1, 2):
        ctx.progress.update(task, description=f"{SUITE}: Flight to --workers {workers}")
        try:
            with _server(world, "workers", env, "--workers", str(workers)) as server:
                addresses = server.flight_addresses
                _warm(addresses, world)
                copies = [world.fresh(f"w{workers}-") for _ in range(repeats)]
                results[workers] = _passes(repeats, lambda: _flight_pass(addresses, copies.pop(), batch_rows=BIG, streams=4))
        except Exception as exc:  # noqa: BLE001 - reported in the row
            _add_failed(ctx, case, [f"--workers {workers}"], exc)
    for workers, (best, median) in results.items():
        ratios = {"vs --workers 1": results[1][0] / best} if workers == 2 and 1 in results else {}
        ctx.add(Row(SUITE, case, f"--workers {workers}", {"rows": n, "batch_rows": BIG}, unit="rows/s", throughput=n / best,
                    seconds=best, median_s=median, repeats=repeats, ratios=ratios, quality={"workers": workers, "streams": 4},
                    notes="Flight exchanges spread over the workers' ports; one SQLite queue"))
    ctx.advance(task)


def _bank(ctx, task, tmp: Path, world: _World, repeats: int, env: dict) -> None:
    case, n = "bank 100k, 64k-row batches", world.table.num_rows
    batches = world.table.to_batches(max_chunksize=BIG)
    ctx.progress.update(task, description=f"{SUITE}: {case}, in process")
    world.engine.triage(batches[0].slice(0, 4096))
    best, median = _passes(repeats, lambda: [world.engine.triage(b) for b in batches])
    engine_rps = n / best
    ctx.add(Row(SUITE, case, "in-process engine", {"rows": n, "batch_rows": BIG, "bank": 100_000, "D": 128}, unit="rows/s",
                throughput=engine_rps, seconds=best, median_s=median, repeats=repeats, quality={"escalated": world.escalated}))
    ctx.progress.update(task, description=f"{SUITE}: {case}, Flight")
    try:
        with _server(world, "bank", env) as server:
            _warm(server.flight, world)
            copies = [world.fresh("b-") for _ in range(repeats)]
            best, median = _passes(repeats, lambda: _flight_pass(server.flight, copies.pop(), batch_rows=BIG, streams=2))
    except Exception as exc:  # noqa: BLE001 - reported in the row
        _add_failed(ctx, case, ["Flight, SQLite queue"], exc)
        ctx.advance(task)
        return
    ctx.add(Row(SUITE, case, "Flight, SQLite queue", {"rows": n, "batch_rows": BIG, "bank": 100_000, "D": 128}, unit="rows/s",
                throughput=n / best, seconds=best, median_s=median, repeats=repeats,
                ratios={"vs in-process engine": n / best / engine_rps}, quality={"streams": 2, "escalated": world.escalated}))
    ctx.advance(task)
