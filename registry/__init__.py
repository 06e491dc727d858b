"""Where releases are recorded and reviewed: MLflow tracking, release records, reports and model cards, and
publishing to the Hugging Face Hub or a local repo-like folder.

Everything here is callable without an orchestrator, so the same code serves the Prefect tasks, the tests and
one-off scripts.
"""
