"""Compress runs at the same time, sharing one work folder, MLflow database and publish root."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect.settings import PREFECT_API_URL

from mobiquant.checkpoint import load_checkpoint
from registry.hashing import tree_manifest
from tests.faults.runs import finish, start_compress
from tests.pipeline.conftest import tiny_params
from tests.pipeline.tiny import build_tiny_llama


def test_concurrent_runs_of_different_and_of_the_same_model(tmp_path: Path, prefect_server: None) -> None:
    api = PREFECT_API_URL.value()
    model_a = build_tiny_llama(tmp_path / "a" / "tiny-a", seed=0)
    model_b = build_tiny_llama(tmp_path / "b" / "tiny-b", seed=1)
    shared = tmp_path / "shared"
    shared.mkdir()
    quick = {"budgets": [4.0], "eval_max_windows": 1}
    runs = {
        "a": start_compress(tiny_params(model_a, shared, **quick), tmp_path / "prefect-a", api),
        "a-again": start_compress(tiny_params(model_a, shared, **quick), tmp_path / "prefect-a2", api),
        "b": start_compress(tiny_params(model_b, shared, **quick), tmp_path / "prefect-b", api),
    }
    summaries = {name: finish(process) for name, process in runs.items()}

    client = MlflowClient(tiny_params(model_a, shared)["mlflow_uri"])
    recorded = {}
    for name, summary in summaries.items():
        run_id = summary["mlflow_run_id"]
        recorded[name] = json.loads(Path(client.download_artifacts(run_id, "sha256.json")).read_text())
        staging = shared / "published" / summary["repo_id"] / "staging"
        # What the staging branch holds is exactly what some run validated and recorded.
        assert tree_manifest(staging) in (recorded[name], recorded.get("a"), recorded.get("a-again"))
    assert summaries["a"]["repo_id"] != summaries["b"]["repo_id"]
    assert summaries["a"]["registered_model"] != summaries["b"]["registered_model"]
    assert summaries["a"]["checkpoint"] == summaries["a-again"]["checkpoint"] != summaries["b"]["checkpoint"]
    # The same model and configuration twice: the runs took turns, and produced the same files.
    assert recorded["a"]["model.safetensors"] == recorded["a-again"]["model.safetensors"]
    assert recorded["a"]["model.safetensors"] != recorded["b"]["model.safetensors"]
    checkpoint_a = Path(summaries["a"]["checkpoint"])
    assert tree_manifest(checkpoint_a)["model.safetensors"] == recorded["a"]["model.safetensors"]
    load_checkpoint(checkpoint_a)
    load_checkpoint(Path(summaries["b"]["checkpoint"]))

    # Every block of model a was calibrated once: the other run waited on its lock and reused the result.
    fresh: dict[int, int] = {}
    for name in ("a", "a-again"):
        artifact = client.download_artifacts(summaries[name]["mlflow_run_id"], "blocks.json")
        blocks = json.loads(Path(artifact).read_text())
        for block in blocks:
            fresh[block["block"]] = fresh.get(block["block"], 0) + (not block.get("cached"))
    assert fresh == {0: 1, 1: 1}
    versions = {s["registered_model"]: s["version"] for s in summaries.values()}
    assert len(versions) == 2 and sorted(summaries[n]["version"] for n in ("a", "a-again")) == ["1", "2"]
