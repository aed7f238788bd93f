"""Protocol definitions of the service and their generated Python stubs.

``triage/v1/triage.proto`` is the project's own API; ``inference/grpc_predict_v2.proto`` is
KServe's Open Inference Protocol v2 (what Triton Inference Server clients speak). The stubs
beside them are generated, never edited: ``python -m hitl_triage.serve.proto`` regenerates them
with grpcio-tools (the same output for the same grpcio-tools version, which the stubs name).
"""
