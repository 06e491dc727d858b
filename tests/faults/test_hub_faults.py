"""The Hub failing mid-publish: HTTP 500, a reset connection, no answer at all."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.compress import compress
from registry import publish
from registry.hashing import tree_manifest
from registry.publish import HubRepoTarget, PublishError
from tests.pipeline.conftest import tiny_params
from tests.pipeline.hub_server import HubServer

COMMIT = r"/commit/staging$"
# One fault of each kind, as the Hub client sees it: a server error, a dropped connection, a hung request.
FAULTS = {
    "http-500": {"status": 500},
    "connection-reset": {"reset": True},
    "timeout": {"delay": 1.5, "status": 504},
}


def _release(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\x01" * 4096)
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\ncard\n")
    return folder


def _target(hub: HubServer, repo: str, attempts: int = 4) -> HubRepoTarget:
    return HubRepoTarget(repo, endpoint=hub.url, attempts=attempts, base_delay=0.05, timeout_s=0.5)


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_transient_fault_is_retried_with_backoff(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    delays: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr(publish.time, "sleep", lambda seconds: delays.append(seconds) or real_sleep(seconds))
    hub.state.fail(COMMIT, times=2, **FAULTS[kind])
    files = _release(tmp_path / "release")
    commit = _target(hub, f"tester/{kind}").stage(files, "stage")
    repo = hub.state.repos[f"tester/{kind}"]
    assert repo.branches["staging"] == commit
    assert set(repo.commits[commit].files) - {".gitattributes"} == set(tree_manifest(files))
    assert delays == [0.05, 0.1], "two failures, two exponentially growing waits"


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_persistent_fault_leaves_the_branch_untouched(hub: HubServer, tmp_path: Path, kind: str) -> None:
    hub.state.fail(COMMIT, times=3, **FAULTS[kind])
    target = _target(hub, f"tester/{kind}", attempts=3)
    with pytest.raises(PublishError, match=r"commit to tester/.*@staging failed after 3 attempts"):
        target.stage(_release(tmp_path / "release"), "stage")
    repo = hub.state.repos[f"tester/{kind}"]
    assert repo.branches["staging"] == repo.branches["main"], "nothing of the release is visible"
    assert target.branch_manifest("staging") == {}


def test_flow_fails_clearly_tags_the_version_and_a_later_run_publishes(
    hub: HubServer, tiny_model: Path, tmp_path: Path, prefect_env: Path
) -> None:
    repo_id = "tester/tiny-down-mobiquant"
    publish_target = {
        "kind": "hub",
        "repo_id": repo_id,
        "endpoint": hub.url,
        "attempts": 2,
        "retry_delay_s": 0.05,
        "timeout_s": 0.5,
    }
    params = tiny_params(tiny_model, tmp_path, publish=publish_target, budgets=[4.0], eval_max_windows=1)
    hub.state.fail(COMMIT, times=1, status=500)
    hub.state.fail(COMMIT, times=1, reset=True)
    with pytest.raises(PublishError, match=rf"commit to {repo_id}@staging failed after 2 attempts") as info:
        compress(**params)
    assert "nothing was published" in str(info.value) and "run the flow again" in str(info.value)
    repo = hub.state.repos[repo_id]
    assert repo.private
    assert repo.branches["staging"] == repo.branches["main"], "nothing visible on the staging branch"
    client = MlflowClient(params["mlflow_uri"])
    name = f"mobiquant-{tiny_model.name}"
    failed = client.get_model_version(name, "1")
    assert failed.tags["publish_status"] == "failed"
    assert "failed after 2 attempts" in failed.tags["publish_error"]
    assert not client.get_registered_model(name).aliases, "a failed publish is no candidate"

    summary = compress(**params)
    staged = repo.commits[repo.branches["staging"]].files
    assert set(staged) - {".gitattributes"} == set(tree_manifest(Path(summary["checkpoint"]).parent / "publish"))
    version = client.get_model_version_by_alias(name, "candidate")
    assert str(version.version) == summary["version"] == "2" and version.tags["publish_status"] == "staged"
