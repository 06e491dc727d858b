"""The compress and promote flows end to end on a tiny random Llama, on Prefect's ephemeral server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect import get_client

from flows.compress import compress
from flows.promote import promote
from registry.hashing import tree_manifest
from registry.publish import PublishError
from registry.release import promote_release
from tasks.gate import GateFailedError
from tests.pipeline.conftest import tiny_params


async def _artifact_keys() -> set[str]:
    async with get_client() as client:
        return {a.key for a in await client.read_artifacts() if a.key}


def test_compress_stages_a_candidate_and_promotion_publishes_it(
    tiny_model: Path, tmp_path: Path, prefect_env: Path
) -> None:
    params = tiny_params(tiny_model, tmp_path)
    summary = compress(**params)

    checkpoint = Path(summary["checkpoint"])
    assert (checkpoint / "config.json").is_file()
    assert json.loads((checkpoint / "config.json").read_text())["quantization_config"]["quant_method"] == "mobiquant"
    staging = tmp_path / "published" / summary["repo_id"] / "staging"
    card = (staging / "README.md").read_text()
    assert "base_model_relation" not in card.split("---")[1]  # a local source has no hub base model
    assert "import mobiquant" in card and "ppl_vs_bits.png" in card
    assert not (tmp_path / "published" / summary["repo_id"] / "main").exists()

    uri = params["mlflow_uri"]
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias(summary["registered_model"], "candidate")
    assert version.tags["gate"] == "passed" and version.tags["publish_status"] == "staged"
    assert version.tags["source_sha"] and version.tags["source"] == str(tiny_model)
    run = client.get_run(version.run_id)
    assert "ppl_fp" in run.data.metrics and "ppl_budget_4" in run.data.metrics
    assert any(k.startswith("loss_block_000_") for k in run.data.metrics)
    assert not any("token" in k.lower() for k in run.data.params)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "ppl_vs_bits.png", "quantization_config.json", "sha256.json"} <= artifacts
    recorded = json.loads(Path(client.download_artifacts(run.info.run_id, "sha256.json")).read_text())
    assert recorded == tree_manifest(staging)

    assert {"calibration-progress", "gate-results", "compression-report"} <= asyncio.run(_artifact_keys())

    result = promote(summary["registered_model"], reviewer="alice", mlflow_uri=uri)
    assert tree_manifest(tmp_path / "published" / summary["repo_id"] / "main") == recorded
    champion = client.get_model_version_by_alias(summary["registered_model"], "champion")
    assert champion.version == version.version and champion.tags["promoted_by"] == "alice"
    assert result["tag"] == f"v{version.version}"
    assert set(client.get_registered_model(summary["registered_model"]).aliases) == {"champion"}
    # Promoted once: a second promotion would move main under the same tag and overwrite the reviewer.
    with pytest.raises(PublishError, match=r"was already promoted by alice \(main commit "):
        promote_release(uri, summary["registered_model"], version=version.version, alias=None, reviewer="bob")
    assert client.get_model_version(summary["registered_model"], version.version).tags["promoted_by"] == "alice"
    elsewhere = tmp_path / "elsewhere" / "mlflow.db"
    with pytest.raises(PublishError, match=r"no MLflow database at .*elsewhere/mlflow\.db"):
        promote_release(f"sqlite:///{elsewhere}", summary["registered_model"], version=None, alias=None,
                        reviewer="alice")
    assert not elsewhere.parent.exists()

    # The same release repo with a fresh MLflow store: its versions number from 1 again, and v1 is taken in the repo.
    main = tree_manifest(tmp_path / "published" / summary["repo_id"] / "main")
    fresh_uri = f"sqlite:///{tmp_path / 'fresh-mlflow.db'}"
    again = compress(**{**params, "mlflow_uri": fresh_uri})
    fresh = MlflowClient(fresh_uri)
    assert str(fresh.get_model_version_by_alias(again["registered_model"], "candidate").version) == "1"
    with pytest.raises(PublishError, match=rf"^{summary['repo_id']} already has the tag v1 \(commit "):
        promote(again["registered_model"], reviewer="bob", mlflow_uri=fresh_uri)
    assert tree_manifest(tmp_path / "published" / summary["repo_id"] / "main") == main
    assert fresh.get_model_version(again["registered_model"], "1").tags["publish_status"] == "staged"


def test_failed_gate_publishes_nothing_and_a_rerun_with_the_gate_changed_measures_nothing_again(
    tiny_model: Path, tmp_path: Path, prefect_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = tiny_params(tiny_model, tmp_path, gate={"max_bits_error": 0.0, "routed_not_worse_than_rtn": False})
    with pytest.raises(GateFailedError, match="quality gate failed: bits@") as info:
        compress(**params)
    report = Path(str(info.value).rsplit("report: ", 1)[1].rstrip(")"))
    assert "Gate: FAILED" in report.read_text()
    assert not (tmp_path / "published").exists()
    client = MlflowClient(params["mlflow_uri"])
    assert client.search_registered_models() == []
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.data.tags["gate"] for r in runs] == ["failed"]
    measured = json.loads((report.parent.parent / "validation.json").read_text())

    # The reviewer relaxes the gate: the same blocks, checkpoint and measurements pass it without recomputing.
    for name in ("mobiquant.calibration.finished_model", "mobiquant.evaluation.perplexity",
                 "mobiquant.evaluation.streamed_perplexities"):
        monkeypatch.setattr(name, _must_not_run)
    summary = compress(**{**params, "gate": {"max_bits_error": 1.0, "routed_not_worse_than_rtn": False}})
    assert summary["gate_passed"] and (tmp_path / "published" / summary["repo_id"] / "staging").is_dir()
    version = client.get_model_version_by_alias(summary["registered_model"], "candidate")
    metrics = client.get_run(version.run_id).data.metrics
    assert metrics["ppl_fp"] == measured["fp"]["ppl"]
    assert [metrics[f"ppl_uniform_{r['slices']}"] for r in measured["uniform"]] == [
        r["ppl"] for r in measured["uniform"]
    ]


def _must_not_run(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("recomputed what an earlier run of the same inputs had finished")
