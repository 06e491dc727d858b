"""Plain (Prefect-free) pipeline helpers: parameters, the gate, MLflow tracking, Hub and local publishing.

Everything here is callable without an orchestrator, so the same code serves the Prefect tasks, the
tests and one-off scripts.
"""
