"""Tasks from a checkpoint to a reviewed release: validate, report (MLflow + Prefect artifacts), publish."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.params import CompressParams
from registry import release
from tasks import stages
from tasks.gate import GateCheck, evaluate_gate, gate_passed


@task(name="validate")
def validate(
    model_dir: str, model_key: str, checkpoint: dict[str, Any], params: CompressParams, out_path: str
) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
    """Measure every setting (or take the measurements of the same checkpoint and settings), then apply the
    gate; returns (validation, checks, passed)."""
    validation = stages.validate(
        Path(model_dir),
        Path(checkpoint["path"]),
        evaluation_data=params.evaluation_data,
        eval_seqlen=params.eval_seqlen,
        eval_max_windows=params.eval_max_windows,
        budgets=params.budgets_to_validate(),
        num_slices=params.num_slices,
        group_size=params.group_size,
        device=params.device,
        out_path=Path(out_path),
        model_key=model_key,
        checkpoint_files=checkpoint["files"],
        tasks=params.gate.gated_tasks(),
        task_bits=sorted(params.gate.min_task_score),
        task_include_path=params.eval_task_include_path,
        task_limit=params.eval_task_limit,
    )
    checks = evaluate_gate(validation, params.gate)
    return validation, [c.to_dict() for c in checks], gate_passed(checks)


@task(name="report")
def report(
    params: CompressParams,
    run_dir: str,
    run_name: str,
    source: dict[str, Any],
    checkpoint: dict[str, Any],
    validation: dict[str, Any],
    checks: list[dict[str, Any]],
    passed: bool,
    stage_times: dict[str, dict[str, float]],
    wall_seconds: float,
    blocks: list[dict[str, Any]],
    kernels: dict[str, Any],
) -> dict[str, Any]:
    """Report bundle, MLflow run (and version when passed), Prefect table and markdown artifacts; ``checkpoint``
    is the checkpoint stage's result (its folder and its files' sha256s)."""
    gate_checks = [GateCheck(**c) for c in checks]
    bundle = release.build_bundle(
        Path(run_dir),
        params=params,
        source=source,
        checkpoint_dir=Path(checkpoint["path"]),
        checkpoint_files=checkpoint["files"],
        validation=validation,
        checks=gate_checks,
        passed=passed,
        stages=stage_times,
        wall_seconds=wall_seconds,
        blocks=blocks,
        kernels=kernels,
    )
    recorded = release.record(
        params,
        source=source,
        bundle=bundle,
        validation=validation,
        checks=gate_checks,
        passed=passed,
        stages=stage_times,
        blocks=blocks,
        checkpoint_dir=Path(checkpoint["path"]),
        run_name=run_name,
        end_to_end=checkpoint.get("end_to_end"),
    )
    create_table_artifact(
        key="gate-results",
        table=[{**c, "value": round(c["value"], 6), "limit": round(c["limit"], 6)} for c in checks],
        description=f"Quality gate of {source['source']}: {'passed' if passed else 'FAILED'}",
    )
    create_markdown_artifact(
        key="compression-report",
        markdown=bundle["report_md"] + f"\n\nMLflow run `{recorded['run_id']}`, version {recorded['version']}\n",
        description=f"MoBiQuant report for {source['source']}",
    )
    return {k: v for k, v in bundle.items() if k != "report_md"} | recorded


@task(name="publish")
def publish(params: CompressParams, bundle: dict[str, Any], version: str, message: str) -> str:
    """Stage the release (one commit on the staging branch); errors after the publisher's own retries."""
    return release.stage_release(params, bundle, version, message)
