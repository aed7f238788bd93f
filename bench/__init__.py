"""Benchmarks of hitl-triage against numpy, torch and peer libraries (not installed with the
package; run from the repository root with ``python -m bench``, see bench/README.md)."""
