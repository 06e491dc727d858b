"""Fixtures of the pipeline tests: a tiny model, isolated Prefect state, a local Hub server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from tests.pipeline.hub_server import HubServer
from tests.pipeline.tiny import build_tiny_llama

HUB_TOKEN = "hf_pipelineTestToken0123456789abcdefXYZ"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-block random Llama (hidden 64) with tokenizer; ``train.txt`` lies beside the folder."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One ephemeral Prefect server for the session (starting one per test costs seconds)."""
    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def prefect_env(prefect_server: None, tmp_path: Path) -> Iterator[Path]:
    """Per-test Prefect home and result storage, so persisted results and caches never leak across tests."""
    home = tmp_path / "prefect-home"
    with temporary_settings({PREFECT_HOME: home, PREFECT_LOCAL_STORAGE_PATH: home / "storage"}):
        yield home


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    """The local Hub API on a free port; the real client is pointed at it and given a token via HF_TOKEN."""
    with HubServer(tokens={HUB_TOKEN}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        # huggingface_hub reads HF_ENDPOINT once at import; subprocesses get the variable, this process the patch.
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", server.url)
        monkeypatch.setattr(
            "huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE",
            server.url + "/{repo_id}/resolve/{revision}/{filename}",
        )
        # Downloads go to this test's HF_HOME, not the user's cache (also read once at import).
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
        yield server


def tiny_params(model_dir: Path, work: Path, **overrides: Any) -> dict[str, Any]:
    """Fast settings for the tiny model: a few seconds per block, permissive gate."""
    corpus = str(model_dir.parent / "train.txt")
    params: dict[str, Any] = {
        "model": str(model_dir),
        "calibration_data": corpus,
        "evaluation_data": corpus,
        "samples": 4,
        "seqlen": 32,
        "epochs_stage1": 1,
        "epochs_stage2": 1,
        "group_size": 32,
        "router_hidden": 8,
        "budgets": [2.5, 4.0],
        "eval_seqlen": 64,
        "eval_max_windows": 4,
        # Thresholds set on 128 tokens of a random model carry over loosely to other text: measured drifts
        # at 4 bits reach 0.5 bits with the same budget in every layer and 1.0 with the cross-layer allocation.
        "gate": {"max_ratio_to_fp": {4.0: 2.0}, "routed_not_worse_than_rtn": False, "max_bits_error": 1.5},
        "publish": {"kind": "local", "root": str(work / "published")},
        "mlflow_uri": f"sqlite:///{work / 'mlflow.db'}",
        "work_dir": str(work / "work"),
        "runner": "thread",
        "workers": 2,
        "kernel_archs": ["sm_80"],
    }
    params.update(overrides)
    return params


def scan_for(root: Path, secret: str) -> list[str]:
    """Every file under ``root`` whose bytes contain ``secret``."""
    needle = secret.encode()
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
