"""The fault tests share the pipeline tests' fixtures: tiny model, Prefect harness, local Hub server."""

from __future__ import annotations

from tests.pipeline.conftest import hub, prefect_env, prefect_server, tiny_model

__all__ = ["hub", "prefect_env", "prefect_server", "tiny_model"]
