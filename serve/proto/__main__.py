"""Regenerate the Python stubs of every .proto under this folder (grpcio-tools, from the test extra)."""

from __future__ import annotations

import re
import sys
from pathlib import Path


def main() -> int:
    from grpc_tools import protoc

    import grpc_tools

    here = Path(__file__).resolve().parent
    include = Path(grpc_tools.__file__).parent / "_proto"
    for proto in sorted(here.rglob("*.proto")):
        relative = proto.relative_to(here)
        code = protoc.main(["grpc_tools.protoc", f"-I{here}", f"-I{include}", f"--python_out={here}",
                            f"--pyi_out={here}", f"--grpc_python_out={here}", str(relative)])
        if code != 0:
            print(f"protoc failed on {relative}", file=sys.stderr)
            return code
        # protoc writes absolute imports ("from triage.v1 import triage_pb2"); the stubs live
        # inside this package, so make them relative.
        stub = here / relative.with_name(relative.stem + "_pb2_grpc.py")
        text = stub.read_text()
        text = re.sub(rf"^from {re.escape('.'.join(relative.parent.parts))} import ", "from . import ", text, flags=re.M)
        stub.write_text(text)
        print(f"generated {relative.with_suffix('')}_pb2.py, _pb2.pyi, _pb2_grpc.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
