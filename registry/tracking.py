"""MLflow: one experiment per source model, one run per compression, a registered version per passing run.

Aliases carry the review state: ``candidate`` (passed the gate, staged, waiting for a reviewer) and
``champion`` (promoted by a reviewer, published on ``main``). Version tags record the source repo and
sha, the gate results, the staged and published commits and the publish status. Every run is tagged with
the mobiquant version and the git commit of the code that made it (:func:`code_tags`).
"""

from __future__ import annotations

import fcntl
import json
import re
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CANDIDATE, CHAMPION = "candidate", "champion"
# Keys whose values must never be recorded, whatever a caller passes in.
_SECRET_KEY = re.compile(r"token|secret|password|credential|api[_-]?key", re.IGNORECASE)
# MLflow's limits on one log_batch request (mlflow.utils.validation) and on a param value.
_METRICS_PER_BATCH = 1000
_PARAMS_PER_BATCH = 100
_PARAM_VALUE_CHARS = 6000
# The checkout holding registry/ (and, installed editable, mobiquant): its commit identifies the code of a run.
_CODE_ROOT = Path(__file__).resolve().parents[1]


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking server or database cannot be used."""


class VersionNotFoundError(LookupError):
    """No such registered model, version or alias."""


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (seconds, not the client's minutes of retries) when MLflow cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:
            response = httpx.get(uri.rstrip("/") + "/health", timeout=timeout)
        except httpx.HTTPError as error:
            raise TrackingUnavailableError(f"MLflow at {redacted_uri(uri)} is unreachable: {error}") from error
        if response.status_code != 200:
            raise TrackingUnavailableError(
                f"MLflow at {redacted_uri(uri)} answered /health with HTTP {response.status_code}"
            )
        return
    database = sqlite_path(uri)
    if database is not None and not database.parent.is_dir():
        raise TrackingUnavailableError(f"MLflow database folder {database.parent} does not exist")
    try:
        if database is None:
            MlflowClient(uri).search_experiments(max_results=1)
            return
        # The first client to open a new database creates its tables; two runs starting together would both
        # try, and one would fail. The lock makes the second wait and find the tables made.
        with open(database.with_name(database.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as error:
        raise TrackingUnavailableError(f"MLflow at {redacted_uri(uri)} cannot be used: {error}") from error
    except ImportError as error:
        # SQLAlchemy imports a database's driver (psycopg, pymysql) only when a store first connects.
        raise TrackingUnavailableError(f"MLflow at {redacted_uri(uri)} needs a database driver: {error}") from error


def redacted_uri(uri: str) -> str:
    """``uri`` with the password it may carry (``https://user:password@host``) replaced by ``***``: what may be
    logged, shown in an error or recorded."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None for any other URI)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :]).expanduser().resolve()


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite database, else the server's default.

    MLflow's own default for a sqlite store is ``./mlruns`` in whatever folder the process runs in, which
    scatters a run's report away from its database.
    """
    database = sqlite_path(uri)
    if database is None:
        return None
    return (database.parent / "mlartifacts" / experiment.replace("/", "_")).as_uri()


def public_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested parameters to MLflow params, dropping anything named like a secret."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if _SECRET_KEY.search(name):
            continue
        if isinstance(value, dict):
            flat.update(public_params(value, prefix=f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


def log_run(
    uri: str,
    *,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    step_metrics: dict[str, list[float]],
    artifacts_dir: Path,
    tags: dict[str, str],
) -> str:
    """Record a finished run in one go and return its id.

    Params and metrics go in batches (``log_batch``: a few requests, not one per value); the run is tagged
    with :func:`code_tags` as well as ``tags``.
    """
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else _create_experiment(client, uri, experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags={**code_tags(), **tags})
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    entries = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
    for key, values in step_metrics.items():
        entries += [Metric(key, float(value), now, step) for step, value in enumerate(values)]
    settings = [Param(key, value[:_PARAM_VALUE_CHARS]) for key, value in public_params(params).items()]
    try:
        for start in range(0, len(settings), _PARAMS_PER_BATCH):
            client.log_batch(run_id, params=settings[start : start + _PARAMS_PER_BATCH])
        for start in range(0, len(entries), _METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=entries[start : start + _METRICS_PER_BATCH])
        client.log_artifacts(run_id, str(artifacts_dir))
    except MlflowException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def code_tags() -> dict[str, str]:
    """The mobiquant version and the git commit of the code (``unknown`` outside a git checkout)."""
    from mobiquant import __version__

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(
                ["git", "-C", str(_CODE_ROOT), *args], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"mobiquant.version": __version__, "mobiquant.git_commit": "unknown"}
    # Uncommitted changes to tracked files mean the commit alone does not reproduce the run.
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {
        "mobiquant.version": __version__,
        "mobiquant.git_commit": commit,
        "mobiquant.git_dirty": str(dirty).lower(),
        "mlflow.source.git.commit": commit,
    }


def _create_experiment(client: MlflowClient, uri: str, experiment: str) -> str:
    try:
        return client.create_experiment(experiment, artifact_location=artifact_location(uri, experiment))
    except MlflowException:
        # A concurrent run of another configuration of the same model created it a moment ago.
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def register_version(uri: str, name: str, run_id: str, source: str, tags: dict[str, str]) -> str:
    """A new version of registered model ``name`` for ``run_id``; returns the version number."""
    client = MlflowClient(uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="MoBiQuant elastic any-precision checkpoints")
        except MlflowException:
            # Created by a concurrent run between the lookup and here; any other problem fails the lookup below.
            client.get_registered_model(name)
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    return str(version.version)


def version_sources(uri: str, name: str) -> set[tuple[str, str]]:
    """The ``(source, source_kind)`` tags of registered model ``name``'s versions (empty when there is no such
    model)."""
    versions = MlflowClient(uri).search_model_versions(f"name = '{name}'")
    return {(version.tags["source"], version.tags.get("source_kind", "")) for version in versions
            if "source" in version.tags}


def tag_version(uri: str, name: str, version: str, tags: dict[str, str]) -> None:
    client = MlflowClient(uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def set_alias(uri: str, name: str, alias: str, version: str) -> None:
    MlflowClient(uri).set_registered_model_alias(name, alias, version)


def drop_alias(uri: str, name: str, alias: str, version: str) -> None:
    """Remove ``alias`` if it points at ``version`` (a newer version that took it keeps it)."""
    client = MlflowClient(uri)
    # The registry gives the aliases as {alias: version}, the version a number.
    if str(client.get_registered_model(name).aliases.get(alias)) == str(version):
        client.delete_registered_model_alias(name, alias)


def get_version(uri: str, name: str, version: str | None = None, alias: str | None = None) -> ModelVersion:
    """A version by number or alias, with a clear error when it does not exist."""
    client = MlflowClient(uri)
    try:
        if version is not None:
            return client.get_model_version(name, version)
        return client.get_model_version_by_alias(name, alias or CANDIDATE)
    except MlflowException as error:
        if not client.search_registered_models(filter_string=f"name = '{name}'"):
            raise VersionNotFoundError(f"no registered model {name!r} in {redacted_uri(uri)}") from error
        what = f"version {version}" if version is not None else f"alias {alias or CANDIDATE!r}"
        raise VersionNotFoundError(f"registered model {name!r} has no {what} in {redacted_uri(uri)}") from error


def run_artifact_text(uri: str, run_id: str, path: str) -> str:
    """The text of one artifact of a run, downloaded into a temporary folder that is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="mobiquant-artifact-") as scratch:
        return Path(MlflowClient(uri).download_artifacts(run_id, path, dst_path=scratch)).read_text()
