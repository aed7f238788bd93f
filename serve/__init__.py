"""The serving layer and the `triage` command line."""
