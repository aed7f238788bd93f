"""The triage service: three faces (triage.v1 gRPC, Arrow Flight, the Open Inference Protocol)
over one engine, one dynamic batcher and one review-queue writer per server process."""
