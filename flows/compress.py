"""The ``compress`` flow: model release -> calibrated, validated MoBiQuant checkpoint -> staged release.

Order of work: validate parameters and reach every service first (MLflow, Prefect API, the Hub when it
is the target) so a typo or an outage fails in seconds; then download, capture, calibrate the blocks
(layer-parallel on the chosen task runner), assemble, router thresholds, kernels, validation, report.
Only a run that passes the gate is registered in MLflow and staged on the publish target; a failed
gate leaves its report and MLflow run, publishes nothing and fails the flow (non-zero exit).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import httpx
from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from registry import tracking
from registry.gate import GateCheck, GateFailedError, failure_message
from registry.params import CompressParams, GateThresholds, PublishTarget, RunnerKind, parse_params
from registry.publish import HubRepoTarget, target_for
from registry.stages import file_lock
from tasks import calibration, release


class PreflightError(RuntimeError):
    """A service the run needs is unreachable or refuses us; nothing heavy has started."""


def preflight(params: CompressParams) -> None:
    """Reach MLflow, the Prefect API and the publish target before any download or calibration."""
    # The Prefect API first: checking it writes nothing, while a first MLflow check creates a sqlite database.
    check_prefect_api()
    try:
        tracking.check_reachable(params.mlflow_uri)
    except tracking.TrackingUnavailableError as error:
        raise PreflightError(str(error)) from error
    target = target_for(params.publish, params.default_repo_id())
    if isinstance(target, HubRepoTarget):
        target.check_access()


def check_prefect_api() -> None:
    """Fail in seconds when the configured Prefect API does not answer (no API configured: ephemeral server)."""
    api_url = PREFECT_API_URL.value()
    if not api_url:
        return
    try:
        response = httpx.get(f"{api_url.rstrip('/')}/health", timeout=5)
    except httpx.HTTPError as error:
        raise PreflightError(f"the Prefect API at {api_url} is unreachable: {error}") from error
    if response.status_code != 200:
        raise PreflightError(f"the Prefect API at {api_url} answered /health with HTTP {response.status_code}")


def task_runner_for(params: CompressParams) -> TaskRunner:
    if params.runner == "process":
        return ProcessPoolTaskRunner(max_workers=params.workers)
    if params.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if params.dask_address:
            return DaskTaskRunner(address=params.dask_address)
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={"n_workers": params.workers, "threads_per_worker": 1, "processes": True},
        )
    return ThreadPoolTaskRunner(max_workers=params.workers)


@flow(name="calibrate-blocks")
def calibrate_blocks(
    model_dir: str, model_sha: str, capture_dir: str, num_blocks: int, params: CompressParams, blocks_dir: str
) -> list[dict[str, Any]]:
    """Every block as its own task (the unit of layer-parallel work), with a live progress artifact.

    Parallel mode submits all blocks at once; sequential mode chains them, since block ``i`` trains
    on the outputs of the already-quantized blocks before it.
    """
    config = params_config(params)
    digest = config_digest(config)
    progress = create_progress_artifact(progress=0.0, key="calibration-progress", description="blocks calibrated")
    futures = []
    for index in range(num_blocks):
        futures.append(
            calibration.calibrate_block.submit(
                model_dir=model_dir,
                model_sha=model_sha,
                block_index=index,
                capture_dir=capture_dir,
                config=config,
                config_digest=digest,
                out_path=str(Path(blocks_dir) / f"block_{index:04d}.safetensors"),
                torch_threads=params.torch_threads,
                wait_for=futures[-1:] if params.mode == "sequential" else None,
            )
        )
    reports: dict[int, dict[str, Any]] = {}
    for future in as_completed(futures):
        report = future.result()
        reports[report["block"]] = report
        update_progress_artifact(progress, 100.0 * len(reports) / num_blocks)
    return [reports[i] for i in range(num_blocks)]


def params_config(params: CompressParams) -> dict[str, Any]:
    """The library's calibration config for these parameters (as a dict: tasks pass data, not objects)."""
    from mobiquant.calibration import CalibrationConfig

    return CalibrationConfig(
        num_slices=params.num_slices,
        group_size=params.group_size,
        router_hidden=params.router_hidden,
        epochs_stage1=params.epochs_stage1,
        epochs_stage2=params.epochs_stage2,
        mode=params.mode,
        seed=params.seed,
    ).to_dict()


def config_digest(config: dict[str, Any]) -> str:
    from mobiquant.calibration import CalibrationConfig

    return CalibrationConfig.from_dict(config).digest()


def _timed(stage_times: dict[str, dict[str, float]], name: str, started: float, work: float) -> None:
    stage_times[name] = {"wall": time.perf_counter() - started, "work": work}


@flow(name="compress", log_prints=True)
def compress(
    model: str,
    revision: str | None = None,
    calibration_data: str = "shakespeare",
    evaluation_data: str = "shakespeare",
    samples: int = 32,
    seqlen: int = 256,
    epochs_stage1: int = 2,
    epochs_stage2: int = 3,
    mode: Literal["parallel", "sequential"] = "parallel",
    num_slices: int = 4,
    group_size: int = 128,
    router_hidden: int = 32,
    seed: int = 0,
    budgets: list[float] | None = None,
    eval_seqlen: int = 256,
    eval_max_windows: int | None = None,
    gate: GateThresholds | None = None,
    publish: PublishTarget | None = None,
    mlflow_uri: str = "sqlite:///mlflow.db",
    registered_model_name: str | None = None,
    work_dir: str = ".mobiquant-work",
    runner: RunnerKind = "thread",
    workers: int = 2,
    dask_address: str | None = None,
    torch_threads: int = 1,
    kernel_archs: list[str] | None = None,
) -> dict[str, Any]:
    """Compress ``model`` into one elastic MoBiQuant checkpoint and stage it for review."""
    wall_start = time.perf_counter()
    given = {k: v for k, v in locals().items() if v is not None and k != "wall_start"}
    params = parse_params(given)
    logger = get_run_logger()
    preflight(params)

    work = Path(params.work_dir).expanduser().resolve()
    stage_times: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    source = calibration.download(params.model, params.revision, str(work / "sources"))
    _timed(stage_times, "download", started, source["seconds"])
    logger.info("source %s (%s) at sha %s", source["source"], source["kind"], source["sha"])

    config = params_config(params)
    digest = config_digest(config)
    data_key = f"{params.calibration_data}-{params.samples}x{params.seqlen}-seed{params.seed}".replace("/", "_")
    capture_dir = work / "captures" / source["sha"][:16] / data_key.replace(":", "_")
    started = time.perf_counter()
    captured = calibration.capture(
        source["path"],
        str(capture_dir),
        calibration_data=params.calibration_data,
        samples=params.samples,
        seqlen=params.seqlen,
        seed=params.seed,
        group_size=params.group_size,
    )
    _timed(stage_times, "capture", started, captured["seconds"])

    # Results are keyed by (model sha, config hash, block): a re-run of a killed run finds them here.
    blocks_dir = work / "blocks" / source["sha"][:16] / f"{digest}-{data_key.replace(':', '_')}"
    started = time.perf_counter()
    blocks = calibrate_blocks.with_options(task_runner=task_runner_for(params))(
        source["path"], source["sha"], str(capture_dir), captured["num_blocks"], params, str(blocks_dir)
    )
    fresh = [b for b in blocks if not b.get("cached")]
    span = max(b["finished"] for b in blocks) - min(b["started"] for b in blocks) if fresh else 0.0
    _timed(stage_times, "calibrate", started, span)
    logger.info("%d blocks calibrated (%d reused from an earlier run)", len(blocks), len(blocks) - len(fresh))

    run_dir = work / "runs" / f"{source['sha'][:16]}-{digest}"
    # Two runs of the same model and configuration share run_dir (same sha, same config hash): the second
    # waits here, then redoes the cheap steps from the blocks the first left, instead of mixing files with it.
    with file_lock(run_dir.parent / f"{run_dir.name}.lock"):
        started = time.perf_counter()
        block_paths = [b["path"] for b in blocks]
        assembled = calibration.assemble(source["path"], block_paths, config, str(run_dir / "assembled"))
        _timed(stage_times, "assemble", started, assembled["seconds"])
        started = time.perf_counter()
        checkpoint = calibration.thresholds(assembled["path"], captured["samples_path"], str(run_dir / "checkpoint"))
        _timed(stage_times, "thresholds", started, checkpoint["seconds"])
        started = time.perf_counter()
        kernels = calibration.compile_kernels(params.kernel_archs, str(run_dir / "kernels"))
        _timed(stage_times, "kernels", started, kernels["seconds"])
        started = time.perf_counter()
        validation, checks, passed = release.validate(
            source["path"], checkpoint["path"], params, str(run_dir / "validation.json")
        )
        _timed(stage_times, "validate", started, validation["seconds"])

        run_name = flow_run.get_name() or f"compress-{source['sha'][:8]}"
        outcome = release.report(
            params,
            str(run_dir),
            run_name,
            source,
            checkpoint["path"],
            validation,
            checks,
            passed,
            stage_times,
            time.perf_counter() - wall_start,
            blocks,
            kernels,
        )
        summary = {
            "checkpoint": checkpoint["path"],
            "report": outcome["report_path"],
            "mlflow_uri": params.mlflow_uri,
            "mlflow_run_id": outcome["run_id"],
            "registered_model": params.model_name(),
            "version": outcome["version"],
            "gate_passed": passed,
            "repo_id": outcome["repo_id"],
        }
        if not passed:
            message = failure_message([GateCheck(**c) for c in checks])
            logger.error("%s; report: %s", message, outcome["report_path"])
            raise GateFailedError(f"{message} (report: {outcome['report_path']})")
        commit = release.publish(
            params, outcome, outcome["version"], f"MoBiQuant {params.source_name()} from {source['sha'][:12]}"
        )
        summary["staged_commit"] = commit
        logger.info(
            "staged %s@%s (commit %s); MLflow %s version %s is the candidate",
            outcome["repo_id"],
            params.publish.staging_branch,
            commit,
            params.model_name(),
            outcome["version"],
        )
        return summary
