"""The ``watch-releases`` flow: compress every new model or revision of configured authors, once per sha.

What has been submitted lives in one small Prefect Variable per repository (``{repo, sha, flow_run_id,
attempts}``: the newest revision submitted), written right after each submission, so a crash between two
submissions cannot submit the same sha twice on the next run, and no single value outgrows Prefect's
limit on a Variable's size however many repositories are watched. A sha whose run ended without
completing (failed, crashed, cancelled) is submitted again on a later run, up to ``max_attempts`` times.
The first run records what it finds with no flow run (seen, not submitted), and ``<variable>-baseline``
marks that watching has begun, unless ``backfill`` asks it to submit those releases too.
"""

from __future__ import annotations

import fnmatch
import hashlib
from typing import Any
from uuid import UUID

import httpx2
from huggingface_hub import HfApi
from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.variables import Variable

from mobiquant.sources import HubUnavailableError

SEEN_VARIABLE = "mobiquant-seen-releases"


def list_releases(authors: list[str], patterns: list[str], endpoint: str | None, limit: int) -> list[tuple[str, str]]:
    """``(repo_id, sha)`` of the newest revision of each model of ``authors`` matching a glob in ``patterns``.

    Every author is listed before anything is submitted: an unreachable Hub fails the run with nothing submitted.
    """
    api = HfApi(endpoint=endpoint)
    found: dict[str, str] = {}
    for author in authors:
        try:
            models = list(api.list_models(author=author, limit=limit, sort="last_modified", expand=["sha"]))
        except httpx2.TransportError as error:
            raise HubUnavailableError(
                f"cannot reach the Hugging Face Hub at {api.endpoint} to list the models of {author}: {error}"
            ) from error
        for info in models:
            if info.sha and (not patterns or any(fnmatch.fnmatch(info.id, p) for p in patterns)):
                found[info.id] = info.sha
    return sorted(found.items())


def record_name(variable: str, repo_id: str) -> str:
    """The Variable holding what was submitted for ``repo_id`` (Variable names allow no '/')."""
    return f"{variable}-{hashlib.sha256(repo_id.encode()).hexdigest()[:16]}"


def run_ended_unfinished(flow_run_id: str) -> bool:
    """Whether the flow run ended without completing (failed, crashed, cancelled) or no longer exists."""
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(UUID(flow_run_id))
        except ObjectNotFound:
            return True
    return run.state is not None and run.state.is_final() and not run.state.is_completed()


@flow(name="watch-releases", log_prints=True)
def watch_releases(
    authors: list[str],
    patterns: list[str] | None = None,
    deployment: str = "compress/llama",
    parameters: dict[str, Any] | None = None,
    endpoint: str | None = None,
    limit: int = 100,
    variable: str = SEEN_VARIABLE,
    max_attempts: int = 2,
    backfill: bool = False,
) -> list[dict[str, str]]:
    """Run ``deployment`` for each new (model, sha), and again for one whose run ended unfinished; returns what
    was submitted. With ``endpoint`` the runs download from that Hub too (``HF_ENDPOINT`` in their environment).

    The first run (nothing recorded under ``variable`` yet) records the releases it finds as seen and submits
    none of them, unless ``backfill``: a filter can match hundreds of existing models, each a long run.
    """
    logger = get_run_logger()
    # Before per-repository records, every sha seen was kept in one Variable: those count as submitted.
    legacy: dict[str, list[str]] = dict(Variable.get(variable, default={}) or {})
    job_variables = {"env": {"HF_ENDPOINT": endpoint}} if endpoint else None
    releases = list_releases(authors, patterns or [], endpoint, limit)
    records = {repo_id: Variable.get(record_name(variable, repo_id), default=None) or {} for repo_id, _ in releases}
    # Watching has begun once anything is recorded; the baseline also marks a begun watch that matched nothing yet.
    baseline = f"{variable}-baseline"
    marked, mark = Variable.get(baseline, default=None), {"releases": len(releases)}
    if not (legacy or any(records.values()) or marked or backfill):
        for repo_id, sha in releases:
            Variable.set(record_name(variable, repo_id), {"repo": repo_id, "sha": sha, "flow_run_id": None,
                                                          "attempts": 0}, overwrite=True)
        Variable.set(baseline, mark, overwrite=True)
        logger.info("first run: %d existing release(s) recorded as seen, none submitted (backfill=True submits them)",
                    len(releases))
        return []
    # Written only when it changes: a nightly run that finds nothing new writes nothing.
    if marked != mark:
        Variable.set(baseline, mark, overwrite=True)
    submitted = []
    for repo_id, sha in releases:
        name = record_name(variable, repo_id)
        record = records[repo_id]
        attempts = 1
        if record.get("sha") == sha:
            # A release recorded by the first run was seen, never submitted.
            if record.get("flow_run_id") is None or not run_ended_unfinished(record["flow_run_id"]):
                continue
            if record.get("attempts", 1) >= max_attempts:
                logger.warning("%s@%s: flow run %s ended unfinished; %d attempts made, not submitting again",
                               repo_id, sha, record["flow_run_id"], record.get("attempts", 1))
                continue
            attempts = record.get("attempts", 1) + 1
        elif sha in legacy.get(repo_id, []):
            continue
        run = run_deployment(
            deployment,
            parameters={**(parameters or {}), "model": repo_id, "revision": sha},
            job_variables=job_variables,
            timeout=0,
        )
        Variable.set(name, {"repo": repo_id, "sha": sha, "flow_run_id": str(run.id), "attempts": attempts},
                     overwrite=True)
        logger.info("release %s@%s (attempt %d): flow run %s", repo_id, sha, attempts, run.id)
        submitted.append({"model": repo_id, "revision": sha, "flow_run_id": str(run.id)})
    logger.info("%d release(s) submitted", len(submitted))
    return submitted
