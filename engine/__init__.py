"""Triage engine: arrays in, decision columns out."""
