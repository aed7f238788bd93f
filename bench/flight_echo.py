"""A Flight server that does no work: the transport's own bound, for the service suite.

``python -m bench.flight_echo REPLY.arrow READY.json`` serves ``DoExchange`` on a free loopback
port and answers every batch it reads with the first ``num_rows`` rows of the batch in
``REPLY.arrow`` (the triage decisions of a real batch: the same bytes back as the service sends),
so a client measured against it pays what `triage serve` pays to move rows in and decisions out,
and nothing else. It writes ``{"flight": port}`` to ``READY.json`` once serving.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.flight as flight
import pyarrow.ipc as ipc


class EchoServer(flight.FlightServerBase):
    def __init__(self, reply):
        super().__init__("grpc+tcp://127.0.0.1:0")
        self.reply = reply

    def do_exchange(self, context, descriptor, reader, writer):
        writer.begin(self.reply.schema)
        for chunk in reader:
            if chunk.data is not None:
                writer.write_batch(self.reply.slice(0, chunk.data.num_rows))


def main(argv: list[str]) -> None:
    reply_path, ready = Path(argv[0]), Path(argv[1])
    with ipc.open_file(reply_path) as f:
        reply = f.read_all().combine_chunks().to_batches()[0]
    server = EchoServer(reply)
    tmp = ready.with_name(ready.name + ".tmp")
    tmp.write_text(json.dumps({"flight": server.port}))
    tmp.replace(ready)
    server.serve()


if __name__ == "__main__":
    main(sys.argv[1:])
