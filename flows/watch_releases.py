"""The ``watch-releases`` flow: compress every new model or revision of configured authors, once per sha.

What has been seen lives in a Prefect Variable (``{repo_id: [sha, ...]}``), updated right after each
submission, so a crash between two submissions cannot submit the same sha twice on the next run.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from huggingface_hub import HfApi
from prefect import flow, get_run_logger
from prefect.deployments import run_deployment
from prefect.variables import Variable

SEEN_VARIABLE = "mobiquant-seen-releases"


def list_releases(authors: list[str], patterns: list[str], endpoint: str | None, limit: int) -> list[tuple[str, str]]:
    """``(repo_id, sha)`` of the newest revision of each model of ``authors`` matching a glob in ``patterns``."""
    api = HfApi(endpoint=endpoint)
    found: dict[str, str] = {}
    for author in authors:
        for info in api.list_models(author=author, limit=limit, sort="last_modified", expand=["sha"]):
            if info.sha and (not patterns or any(fnmatch.fnmatch(info.id, p) for p in patterns)):
                found[info.id] = info.sha
    return sorted(found.items())


@flow(name="watch-releases", log_prints=True)
def watch_releases(
    authors: list[str],
    patterns: list[str] | None = None,
    deployment: str = "compress/llama",
    parameters: dict[str, Any] | None = None,
    endpoint: str | None = None,
    limit: int = 100,
    variable: str = SEEN_VARIABLE,
) -> list[dict[str, str]]:
    """Run ``deployment`` for each new (model, sha); returns what was submitted."""
    logger = get_run_logger()
    seen: dict[str, list[str]] = dict(Variable.get(variable, default={}) or {})
    submitted = []
    for repo_id, sha in list_releases(authors, patterns or [], endpoint, limit):
        if sha in seen.get(repo_id, []):
            continue
        run = run_deployment(
            deployment, parameters={**(parameters or {}), "model": repo_id, "revision": sha}, timeout=0
        )
        seen.setdefault(repo_id, []).append(sha)
        Variable.set(variable, seen, overwrite=True)
        logger.info("new release %s@%s: flow run %s", repo_id, sha, run.id)
        submitted.append({"model": repo_id, "revision": sha, "flow_run_id": str(run.id)})
    logger.info("%d new release(s)", len(submitted))
    return submitted
