"""watch-releases against the local Hub: each new (model, sha) starts the compress deployment once, and again only
when its run ended unfinished."""

from __future__ import annotations

import asyncio
import socket
from datetime import datetime
from pathlib import Path
from uuid import UUID

import pytest
from prefect import get_client
from prefect.states import Failed
from prefect.variables import Variable

from flows.compress import compress
from flows.watch_releases import watch_releases
from mobiquant.sources import HubUnavailableError
from tests.pipeline.hub_server import HubServer


async def _runs_of(deployment_id: str) -> list:
    async with get_client() as client:
        runs = await client.read_flow_runs()
    return [r for r in runs if str(r.deployment_id) == deployment_id]


async def _variable_names() -> list[str]:
    async with get_client() as client:
        return [v.name for v in await client.read_variables()]


async def _last_written(variable: str) -> datetime | None:
    async with get_client() as client:
        found = await client.read_variable_by_name(variable)
    assert found is not None, variable
    return found.updated


async def _fail(flow_run_id: str) -> None:
    async with get_client() as client:
        await client.set_flow_run_state(UUID(flow_run_id), Failed(), force=True)


def test_new_releases_run_once_per_sha_and_again_after_an_unfinished_run(
    hub: HubServer, tiny_model: Path, prefect_env: Path
) -> None:
    deployment_id = str(compress.to_deployment(name="llama", parameters={"model": "org/placeholder"}).apply())
    hub.state.add_folder("acme/model-a", tiny_model)
    hub.state.add_folder("acme/other", tiny_model)
    hub.state.add_folder("someone/model-b", tiny_model)
    # An earlier release of this flow kept every sha in one Variable, close to Prefect's 5000-character limit on a
    # value; its shas still count as submitted, and it no longer has to grow.
    legacy = {f"acme/old-{i}": [f"{i:040x}"] for i in range(80)}
    Variable.set("seen-test", legacy)

    def watch() -> list[dict[str, str]]:
        return watch_releases(authors=["acme"], patterns=["acme/model-*"], endpoint=hub.url, variable="seen-test")

    first = watch()
    assert [r["model"] for r in first] == ["acme/model-a"]
    assert watch() == []

    asyncio.run(_fail(first[0]["flow_run_id"]))
    retried = watch()
    assert [(r["model"], r["revision"]) for r in retried] == [("acme/model-a", first[0]["revision"])]
    asyncio.run(_fail(retried[0]["flow_run_id"]))
    assert watch() == [], "max_attempts (2) reached"

    repo = hub.state.repos["acme/model-a"]
    hub.state.commit(repo, "main", {"extra.txt": b"new revision"}, set(), "update")
    third = watch()
    assert [(r["model"], r["revision"]) for r in third] == [("acme/model-a", repo.branches["main"])]

    runs = asyncio.run(_runs_of(deployment_id))
    revisions = [first[0]["revision"], retried[0]["revision"], third[0]["revision"]]
    assert sorted(r.parameters["revision"] for r in runs) == sorted(revisions)
    # The runs download from the Hub the release was found on.
    assert {r.job_variables["env"]["HF_ENDPOINT"] for r in runs} == {hub.url}
    assert Variable.get("seen-test") == legacy


def test_an_unreachable_hub_is_one_line_naming_it_and_nothing_is_recorded(
    prefect_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # HF_ENDPOINT as huggingface_hub reads it (once, at import).
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", closed)
    with pytest.raises(HubUnavailableError) as info:
        watch_releases(authors=["acme"], variable="seen-unreachable")
    message = str(info.value)
    assert message.startswith(f"cannot reach the Hugging Face Hub at {closed} to list the models of acme: ")
    assert "\n" not in message
    assert not [name for name in asyncio.run(_variable_names()) if name.startswith("seen-unreachable")]


def test_the_first_run_records_the_existing_releases_without_submitting_them_unless_backfill(
    hub: HubServer, tiny_model: Path, prefect_env: Path
) -> None:
    deployment_id = str(compress.to_deployment(name="llama", parameters={"model": "org/placeholder"}).apply())
    earlier = len(asyncio.run(_runs_of(deployment_id)))  # the session's Prefect server keeps other tests' runs
    hub.state.add_folder("acme/model-a", tiny_model)

    def watch(variable: str, **options: object) -> list[str]:
        found = watch_releases(authors=["acme"], endpoint=hub.url, variable=variable, **options)
        return [r["model"] for r in found]

    assert watch("seen-first") == [] and len(asyncio.run(_runs_of(deployment_id))) == earlier
    baseline_written = asyncio.run(_last_written("seen-first-baseline"))
    assert watch("seen-first") == []
    assert asyncio.run(_last_written("seen-first-baseline")) == baseline_written, "nothing new, nothing written"
    hub.state.add_folder("acme/model-b", tiny_model)
    assert watch("seen-first") == ["acme/model-b"]
    assert Variable.get("seen-first-baseline") == {"releases": 2}
    # A first run whose filter matched nothing: what appears later is new.
    assert watch("seen-empty", patterns=["acme/model-c*"]) == []
    hub.state.add_folder("acme/model-c", tiny_model)
    assert watch("seen-empty", patterns=["acme/model-c*"]) == ["acme/model-c"]
    assert watch("seen-backfill", backfill=True) == ["acme/model-a", "acme/model-b", "acme/model-c"]
    assert len(asyncio.run(_runs_of(deployment_id))) == earlier + 5
