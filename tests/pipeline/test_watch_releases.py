"""watch-releases against the local Hub: each new (model, sha) starts the compress deployment exactly once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prefect import get_client

from flows.compress import compress
from flows.watch_releases import watch_releases
from tests.pipeline.hub_server import HubServer


async def _runs_of(deployment_id: str) -> list[dict]:
    async with get_client() as client:
        runs = await client.read_flow_runs()
    return [r.parameters for r in runs if str(r.deployment_id) == deployment_id]


def test_new_releases_run_once_per_sha(hub: HubServer, tiny_model: Path, prefect_env: Path) -> None:
    deployment_id = str(compress.to_deployment(name="llama", parameters={"model": "org/placeholder"}).apply())
    hub.state.add_folder("acme/model-a", tiny_model)
    hub.state.add_folder("acme/other", tiny_model)
    hub.state.add_folder("someone/model-b", tiny_model)

    first = watch_releases(authors=["acme"], patterns=["acme/model-*"], endpoint=hub.url, variable="seen-test")
    assert [r["model"] for r in first] == ["acme/model-a"]
    assert watch_releases(authors=["acme"], patterns=["acme/model-*"], endpoint=hub.url, variable="seen-test") == []

    repo = hub.state.repos["acme/model-a"]
    hub.state.commit(repo, "main", {"extra.txt": b"new revision"}, set(), "update")
    third = watch_releases(authors=["acme"], patterns=["acme/model-*"], endpoint=hub.url, variable="seen-test")
    assert [(r["model"], r["revision"]) for r in third] == [("acme/model-a", repo.branches["main"])]

    submitted = asyncio.run(_runs_of(deployment_id))
    assert sorted(p["revision"] for p in submitted) == sorted([first[0]["revision"], third[0]["revision"]])
