"""Secrets and supply chain: the Hub token never written anywhere, safetensors only, pinned downloads,
private repos until promotion, sha256 of every published file in MLflow and the model card."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants
from mlflow.tracking import MlflowClient
from prefect import get_client
from transformers import AutoTokenizer

from flows.compress import compress
from flows.promote import promote
from mobiquant.model_files import ModelFiles
from mobiquant.sources import hub_source
from registry.hashing import sha256_file, tree_manifest
from registry.publish import HubRepoTarget
from tests.pipeline.conftest import HUB_TOKEN, scan_for, tiny_params
from tests.pipeline.hub_server import HubServer

ROOT = Path(__file__).resolve().parents[2]


async def _prefect_records() -> str:
    """Everything the Prefect API holds about the runs: parameters, states, logs, artifacts, variables."""
    async with get_client() as client:
        flow_runs = await client.read_flow_runs()
        task_runs = await client.read_task_runs()
        logs = await client.read_logs()
        artifacts = await client.read_artifacts()
        variables = await client.read_variables()
    records = [r.model_dump_json() for r in [*flow_runs, *task_runs, *logs, *artifacts, *variables]]
    assert flow_runs and logs and artifacts, "the scan reads real records"
    return "\n".join(records)


def test_planted_token_appears_in_no_output(
    tiny_model: Path, tmp_path: Path, prefect_env: Path, hub: HubServer, capfd: pytest.CaptureFixture[str]
) -> None:
    hub.state.add_folder("tester/tiny-llama", tiny_model, card_data={"license": "apache-2.0"}, private=True)
    repo_id = "tester/tiny-llama-mobiquant"
    params = tiny_params(
        tiny_model,
        tmp_path,
        model="tester/tiny-llama",
        publish={"kind": "hub", "repo_id": repo_id, "endpoint": hub.url, "public_on_promotion": True},
        budgets=[4.0],
        eval_max_windows=1,
    )
    summary = compress(**params)
    repo = hub.state.repos[repo_id]
    assert repo.private, "created private"
    staged = repo.commits[repo.branches["staging"]].files
    card = staged["README.md"].decode()
    assert "base_model: tester/tiny-llama" in card and "base_model_relation: quantized" in card

    # sha256 of every published file: in MLflow (what promotion checks against) and in the model card.
    client = MlflowClient(params["mlflow_uri"])
    recorded = json.loads(Path(client.download_artifacts(summary["mlflow_run_id"], "sha256.json")).read_text())
    published = {path: hashlib.sha256(data).hexdigest() for path, data in staged.items() if path != ".gitattributes"}
    assert recorded == published
    for path, digest in published.items():
        if path != "README.md":  # the card cannot hold its own hash
            assert f"| {path} | `{digest}` |" in card
    # The source was downloaded at the commit the Hub resolved, and that commit is what MLflow records.
    assert (
        client.get_run(summary["mlflow_run_id"]).data.tags["source_sha"]
        == hub.state.repos["tester/tiny-llama"].branches["main"]
    )

    promote(summary["registered_model"], reviewer="alice", mlflow_uri=params["mlflow_uri"])
    assert not repo.private, "public once a reviewer promoted it (public_on_promotion)"

    # Every file written: work folders, MLflow database and artifacts, published folder, HF cache, Prefect home.
    assert scan_for(tmp_path, HUB_TOKEN) == []
    assert not [path for path, data in staged.items() if HUB_TOKEN.encode() in data]
    assert HUB_TOKEN not in asyncio.run(_prefect_records())
    out, err = capfd.readouterr()
    assert HUB_TOKEN not in out + err
    assert not (ROOT / "mlruns").exists() or scan_for(ROOT / "mlruns", HUB_TOKEN) == []
    params_logged = client.get_run(summary["mlflow_run_id"]).data.params
    assert not any("token" in key.lower() for key in params_logged)


def test_token_from_the_credential_store(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    token_file = tmp_path / "hf-home" / "token"
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(HUB_TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    assert HubRepoTarget("tester/stored", endpoint=hub.url, base_delay=0.01).check_access() == "tester"


def test_repo_is_public_only_when_configured(hub: HubServer, tmp_path: Path) -> None:
    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    HubRepoTarget("tester/open", endpoint=hub.url, private=False, base_delay=0.01).stage(folder, "stage")
    HubRepoTarget("tester/closed", endpoint=hub.url, base_delay=0.01).stage(folder, "stage")
    assert not hub.state.repos["tester/open"].private and hub.state.repos["tester/closed"].private


def test_download_is_pinned_to_the_resolved_commit(
    hub: HubServer, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = hub.state.add_folder("tester/moving", tiny_model)
    resolved = repo.branches["main"]
    real_info = HfApi.model_info

    def info_then_move(self: HfApi, *args: object, **kwargs: object) -> object:
        info = real_info(self, *args, **kwargs)
        # The branch moves between resolving it and downloading: new weights land on main.
        hub.state.commit(repo, "main", {"model.safetensors": b"not the validated weights"}, set(), "moved")
        return info

    monkeypatch.setattr(HfApi, "model_info", info_then_move)
    source = hub_source("tester/moving", cache_dir=tmp_path / "cache")
    assert source.sha == resolved != repo.branches["main"]
    assert sha256_file(source.path / "model.safetensors") == sha256_file(tiny_model / "model.safetensors")


def test_remote_code_and_pickles_are_never_downloaded(hub: HubServer, tiny_model: Path, tmp_path: Path) -> None:
    files = {p.name: p.read_bytes() for p in tiny_model.iterdir()}
    marker = tmp_path / "code-ran"
    files["modeling_evil.py"] = f"open({str(marker)!r}, 'w').write('ran')\n".encode()
    files["pytorch_model.bin"] = b"pickle bytes"
    config = json.loads(files["config.json"])
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    files["config.json"] = json.dumps(config).encode()
    hub.state.add_repo("tester/evil", files)
    source = hub_source("tester/evil", cache_dir=tmp_path / "cache")
    fetched = set(tree_manifest(source.path))
    assert "modeling_evil.py" not in fetched and "pytorch_model.bin" not in fetched
    ModelFiles(source.path).check()
    AutoTokenizer.from_pretrained(source.path)
    assert not marker.exists(), "trust_remote_code stays off"
