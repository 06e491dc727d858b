"""The ``promote`` flow: a reviewer's decision that publishes a candidate on ``main``.

Review happens in MLflow (the run's report, plot, gate table and file hashes); promotion is an explicit
run of this flow naming the reviewer, so no public release happens without a person. It checks the
staged files against the sha256 record in MLflow, commits them to ``main``, tags ``v<version>``, makes
the repo public if configured, and moves the MLflow alias ``champion`` to the version.
"""

from __future__ import annotations

import argparse
import os
import sys

from mlflow.exceptions import MlflowException
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed

from flows.params import InvalidParametersError
from registry.publish import PublishError
from registry.release import promote_release
from registry.tracking import CANDIDATE, VersionNotFoundError

# Failures a promotion expects and explains in one line (a refused or unready release, no such version, an MLflow
# store that refuses us): their tracebacks say nothing more to the reviewer.
EXPECTED_ERRORS = (PublishError, VersionNotFoundError, InvalidParametersError, MlflowException)


@flow(name="promote", log_prints=True)
def promote(
    registered_model_name: str,
    reviewer: str,
    version: str | None = None,
    alias: str = CANDIDATE,
    mlflow_uri: str = "sqlite:///mlflow.db",
) -> dict[str, str]:
    """Publish ``version`` (or the version holding ``alias``) of ``registered_model_name`` to ``main``.

    An expected failure (:data:`EXPECTED_ERRORS`) ends the run in a Failed state whose message is its one line, logged
    without a traceback; calling the flow still raises the error. Other errors, and every error with
    ``MOBIQUANT_DEBUG=1``, keep Prefect's traceback."""
    try:
        return _promote(registered_model_name, reviewer, version, alias, mlflow_uri)
    except EXPECTED_ERRORS as error:
        if os.environ.get("MOBIQUANT_DEBUG"):
            raise
        # As in the compress flow: Prefect logs a returned Failed state as one line and raises its data to the caller.
        return Failed(message=_message(error), data=error)


def _message(error: Exception) -> str:
    # MlflowException keeps its text in .message (its str() is a JSON-ish repr on some versions).
    return getattr(error, "message", None) or str(error)


def _promote(registered_model_name: str, reviewer: str, version: str | None, alias: str,
             mlflow_uri: str) -> dict[str, str]:
    if not reviewer.strip():
        raise InvalidParametersError("promotion needs the reviewer's name")
    result = promote_release(mlflow_uri, registered_model_name, version=version, alias=alias, reviewer=reviewer)
    get_run_logger().info(
        "%s version %s published to %s@main as %s (commit %s), alias champion",
        registered_model_name,
        result["version"],
        result["repo_id"],
        result["tag"],
        result["commit"],
    )
    create_markdown_artifact(
        key="promotion",
        markdown=(
            f"# Promoted {registered_model_name} v{result['version']}\n\n"
            f"Reviewer: {reviewer}\n\nRepo `{result['repo_id']}` main commit `{result['commit']}`, "
            f"tag `{result['tag']}`\n"
        ),
    )
    return result


def build_parser() -> argparse.ArgumentParser:
    """``python -m flows.promote``'s arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.promote", description="Promote a reviewed MoBiQuant candidate to main."
    )
    parser.add_argument(
        "registered_model_name", help="the MLflow registered model, e.g. mobiquant-<model> (the compress run prints it)"
    )
    parser.add_argument("--reviewer", required=True, help="the reviewer's name, recorded with the release")
    parser.add_argument("--version", help="the version to promote (default: the one holding --alias)")
    parser.add_argument(
        "--alias", default=CANDIDATE, help="promote the version holding this alias (default: %(default)s)"
    )
    parser.add_argument(
        "--mlflow-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI (default: %(default)s)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.promote NAME --reviewer WHO``: the same flow, started from a shell."""
    args = build_parser().parse_args(argv)
    try:
        result = promote(args.registered_model_name, args.reviewer, args.version, args.alias, args.mlflow_uri)
    except EXPECTED_ERRORS as error:
        print(f"promote: error: {_message(error)}", file=sys.stderr)
        return 1
    print(f"published {result['repo_id']}@main commit {result['commit']} (tag {result['tag']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
