"""Layer-parallel calibration on a Dask LocalCluster (resume after SIGKILL: tests/faults/test_resume.py)."""

from __future__ import annotations

from pathlib import Path

from flows.compress import compress
from tests.pipeline.conftest import tiny_params


def test_dask_local_cluster_of_two_workers(tiny_model: Path, tmp_path: Path, prefect_env: Path) -> None:
    summary = compress(**tiny_params(tiny_model, tmp_path, runner="dask", workers=2))
    assert Path(summary["checkpoint"], "config.json").is_file()
