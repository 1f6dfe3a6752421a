"""Consortium layer: the CLI, the consortium.yaml schema, the audit log and the orchestration of runs."""
