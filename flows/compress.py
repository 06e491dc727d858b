"""The ``compress`` flow: model release -> calibrated, validated MoBiQuant checkpoint -> staged release.

Order of work: validate parameters and reach every service first (MLflow, Prefect API, the Hub when it
is the target) so a typo or an outage fails in seconds; then download, capture, calibrate the blocks
(layer-parallel on the chosen task runner), the checkpoint (assembled, router thresholds set), kernels,
validation, report.
Only a run that passes the gate is registered in MLflow and staged on the publish target; a failed
gate leaves its report and MLflow run, publishes nothing and fails the flow (non-zero exit).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
import httpx2
import yaml
from mlflow.exceptions import MlflowException
from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Failed
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from flows.params import (
    SMOLLM2_ALIAS,
    SMOLLM2_BASE_MODEL,
    CompressParams,
    GateThresholds,
    InvalidParametersError,
    PublishTarget,
    RunnerKind,
    parse_params,
)
from registry import tracking
from registry.publish import HubRepoTarget, PublishError, check_writable, same_hub_name, target_for
from registry.report import unreached_linears
from tasks import calibration, release
from tasks.gate import GateCheck, GateFailedError, failure_message
from tasks.stages import file_lock

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class PreflightError(RuntimeError):
    """A service the run needs is unreachable or refuses us; nothing heavy has started."""


# Failures the run expects and explains in one line: their tracebacks say nothing more to the user.
EXPECTED_ERRORS = (GateFailedError, PublishError, PreflightError, InvalidParametersError)


class _ExpectedErrorsInOneLine(logging.Filter):
    """Drops the traceback from a log record of an expected error (:data:`EXPECTED_ERRORS`), keeping its line.

    Prefect's task run engine logs a task's exception with its traceback ("Task run failed with exception: ...").
    A task that returns a Failed state instead is logged with ``exc_info`` and no exception ("NoneType: None"), and
    its caller gets the state, not the error; so a task (``publish``) raises, and this filter on the task runs'
    logger keeps that record to its line. The flow returns a Failed state (:func:`compress`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        expected = record.exc_info and isinstance(record.exc_info[1], EXPECTED_ERRORS)
        if expected and not os.environ.get("MOBIQUANT_DEBUG"):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_expected_errors() -> None:
    """Log the expected errors of task runs in this process on one line (idempotent; other errors are untouched)."""
    task_runs = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, _ExpectedErrorsInOneLine) for f in task_runs.filters):
        task_runs.addFilter(_ExpectedErrorsInOneLine())


def preflight(params: CompressParams) -> CompressParams:
    """Reach MLflow, the Prefect API and the publish target before any download or calibration; returns ``params``
    with the Hub repo the release goes to (see :func:`resolve_hub_repo`)."""
    # The Prefect API first: checking it writes nothing, while a first MLflow check creates a sqlite database.
    check_prefect_api()
    check_device(params)
    check_gated_tasks(params)
    check_data(params)
    check_model_shapes(params)
    try:
        tracking.check_reachable(params.mlflow_uri)
    except tracking.TrackingUnavailableError as error:
        raise PreflightError(str(error)) from error
    check_registered_model(params)
    target = target_for(params.publish, params.default_repo_id())
    if isinstance(target, HubRepoTarget):
        return resolve_hub_repo(params, target)
    check_publish_folder(target.path, params)
    try:
        target.check_branch(params.publish.staging_branch)
    except PublishError as error:
        raise PreflightError(str(error)) from error
    return params


def check_registered_model(params: CompressParams) -> None:
    """Refuse a default registered model (``mobiquant-<name>``, the source without its owner, as the default repo)
    that holds releases of another owner's model of the same name: their versions, candidate and champion would
    mix. Only Hub sources are compared (and the embedded SmolLM2, as its Hub base): a local folder or file is
    recorded as each run was given it, relative or not."""
    expected = params.base_model()
    if params.registered_model_name or expected is None:
        return
    name = params.model_name()
    try:
        recorded = tracking.version_sources(params.mlflow_uri, name)
    except MlflowException as error:
        raise PreflightError(f"MLflow at {tracking.redacted_uri(params.mlflow_uri)} cannot list the versions of "
                             f"{name}: {error.message}") from error
    hub_sources = {SMOLLM2_BASE_MODEL if source == SMOLLM2_ALIAS else source for source, kind in recorded
                   if kind == "hub" or source == SMOLLM2_ALIAS}
    others = sorted(s for s in hub_sources if not same_hub_name(s, expected))
    if others:
        raise PreflightError(f"registered model {name} holds the releases of {others[0]}, not of {expected}: set "
                             "registered_model_name")


def resolve_hub_repo(params: CompressParams, hub: HubRepoTarget) -> CompressParams:
    """``params`` with ``publish.repo_id`` set: without one, ``<the token's user>/<repo_name>`` (the source's owner
    is seldom a namespace the user can write); refused unless the token can write that repo."""
    who = hub.whoami()
    if params.publish.repo_id:
        repo_id = params.publish.repo_id
        check_writable(who, repo_id, hub.api.endpoint, target_for(params.publish, repo_id).exists)
        return params
    repo_id = f"{who['name']}/{params.repo_name()}"
    target = target_for(params.publish, repo_id)
    check_writable(who, repo_id, hub.api.endpoint, target.exists)
    # The default names the source without its owner: another owner's model of the same name must not share it.
    expected, released = params.base_model(), target.released_base_model()
    if expected is not None and released is not None and not same_hub_name(released, expected):
        raise PublishError(f"{repo_id} holds the release of {released}, not of {expected}: set publish.repo_id to "
                           "another repo")
    return params.model_copy(update={"publish": params.publish.model_copy(update={"repo_id": repo_id})})


def check_publish_folder(folder: Path, params: CompressParams) -> None:
    """A local publish target may neither be nor contain the source model, the work folder or the cache."""
    from mobiquant.data import cache_root
    from mobiquant.outputs import is_within

    protected = [("work folder", Path(params.work_dir)), ("mobiquant cache", cache_root())]
    if Path(params.model).expanduser().exists():
        protected.append(("source model", Path(params.model)))
    resolved = folder.resolve()
    for what, path in protected:
        guarded = path.expanduser().resolve()
        if is_within(guarded, resolved):
            raise PreflightError(f"publish target {folder} is or contains the {what} ({guarded}): choose another root")


def source_config(params: CompressParams) -> PretrainedConfig | None:
    """The source model's configuration, read without its weights (for a Hub id only ``config.json`` is downloaded,
    into the cache the download stage uses); None when it cannot be fetched or read here."""
    from huggingface_hub import hf_hub_download
    from transformers import AutoConfig

    from mobiquant.arch import architecture_for
    from mobiquant.sources import gguf_config, read_config_json, smollm2_gguf_path

    path = Path(params.model).expanduser()
    try:
        if params.model == SMOLLM2_ALIAS or path.is_file():
            return gguf_config(smollm2_gguf_path() if params.model == SMOLLM2_ALIAS else path)
        if not path.is_dir():
            work = Path(params.work_dir).expanduser().resolve()
            path = Path(hf_hub_download(params.model, "config.json", revision=params.revision,
                                        cache_dir=work / "sources")).parent
        # A family this project does not support is named in its words, before transformers reads the file in its own.
        architecture_for(str(read_config_json(path / "config.json").get("model_type")))
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, KeyError, httpx2.HTTPError):
        # A missing repo, revision, file or access, an unreachable Hub, a GGUF file that does not parse: the
        # download stage names each of these in its own words.
        return None


def check_model_shapes(params: CompressParams) -> None:
    """The calibration settings fit the model's shapes (every quantized linear's inputs split into whole groups of
    ``group_size``), checked on its configuration before any weights are downloaded."""
    from mobiquant.calibration import CalibrationConfig
    from mobiquant.calibration.driver import check_config
    from mobiquant.model_files import InMemoryModel, skeleton

    try:
        config = source_config(params)
        if config is None:
            return
        check_config(InMemoryModel(skeleton(config)), CalibrationConfig.from_dict(params_config(params)))
    except ValueError as error:
        raise InvalidParametersError(f"{params.model}: {error}") from error


def check_data(params: CompressParams) -> None:
    """Both texts name an existing path or a known data set: a typo in either fails before the download."""
    from mobiquant.data import DataSourceError, check_data_source

    for role, source in (("calibration_data", params.calibration_data), ("evaluation_data", params.evaluation_data)):
        try:
            check_data_source(source)
        except DataSourceError as error:
            raise PreflightError(f"{role}: {error}") from error


def check_device(params: CompressParams) -> None:
    """The device exists here and the compute dtype suits it; a remote Dask cluster's workers resolve their own (a
    local cluster's workers are this machine)."""
    from mobiquant.devices import DeviceError, check_bf16_products, resolve_device

    if params.runner == "dask" and params.dask_address:
        return
    try:
        device = resolve_device(params.device)
    except DeviceError as error:
        raise PreflightError(str(error)) from error
    if params.compute_dtype != "float32" and device.type != "cuda":
        raise PreflightError(f"compute_dtype {params.compute_dtype} needs a CUDA device; {device} computes in float32")
    if params.end_to_end_steps and params.end_to_end_dtype == "bfloat16":
        try:
            check_bf16_products(device, "end_to_end_dtype bfloat16")
        except ValueError as error:
            raise PreflightError(str(error)) from error


def check_gated_tasks(params: CompressParams) -> None:
    """The lm-eval tasks the gate scores exist (and lm-eval is installed) before any work starts."""
    tasks = params.gate.gated_tasks()
    if not tasks:
        return
    from mobiquant.harness import HarnessError, check_tasks, task_manager

    try:
        check_tasks(task_manager(params.eval_task_include_path), tasks)
    except HarnessError as error:
        raise PreflightError(str(error)) from error


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
    """The block tasks' runner; with Dask on CUDA each worker process owns one GPU."""
    if params.runner == "process":
        return ProcessPoolTaskRunner(max_workers=params.workers)
    if params.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if params.dask_address:
            return DaskTaskRunner(address=params.dask_address)
        return DaskTaskRunner(**dask_cluster_for(params))
    return ThreadPoolTaskRunner(max_workers=params.workers)


def dask_cluster_for(params: CompressParams) -> dict[str, Any]:
    """A local Dask cluster: one single-threaded worker per GPU (dask-cuda where installed), else per CPU share."""
    from mobiquant.devices import block_devices, dask_gpu_workers, resolve_device

    device = resolve_device(params.device)
    if device.type != "cuda":
        return {"cluster_class": "distributed.LocalCluster",
                "cluster_kwargs": {"n_workers": params.workers, "threads_per_worker": 1, "processes": True}}
    gpus = [str(torch_device_index(d)) for d in block_devices(device, params.workers)]
    if importlib.util.find_spec("dask_cuda") is not None:
        return {"cluster_class": "dask_cuda.LocalCUDACluster",
                "cluster_kwargs": {"CUDA_VISIBLE_DEVICES": ",".join(gpus), "threads_per_worker": 1}}
    return {"cluster_class": "distributed.SpecCluster",
            "cluster_kwargs": {"workers": dask_gpu_workers([int(g) for g in gpus]),
                               "scheduler": {"cls": "distributed.Scheduler", "options": {"dashboard_address": ":0"}}}}


def torch_device_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def block_task_devices(params: CompressParams) -> list[str]:
    """What each block task leases from: ``cuda:0..N-1`` for N threads or processes; a Dask worker its own GPU."""
    from mobiquant.devices import block_devices, resolve_device

    if params.runner == "dask":
        # Each worker resolves the device itself: on a GPU worker "auto" is the one GPU it sees.
        return [params.device]
    return block_devices(resolve_device(params.device), params.workers)


@flow(name="calibrate-blocks")
def calibrate_blocks(
    model_dir: str, capture_dir: str, num_blocks: int, params: CompressParams, blocks_dir: str
) -> list[dict[str, Any]]:
    """Every block as its own task (the unit of layer-parallel work), with a live progress artifact.

    Parallel mode submits all blocks at once; sequential mode chains them, since block ``i`` trains
    on the outputs of the already-quantized blocks before it.
    """
    config = params_config(params)
    devices = block_task_devices(params)
    progress = create_progress_artifact(progress=0.0, key="calibration-progress", description="blocks calibrated")
    futures = []
    for index in range(num_blocks):
        futures.append(
            calibration.calibrate_block.submit(
                model_dir=model_dir,
                block_index=index,
                capture_dir=capture_dir,
                config=config,
                blocks_dir=blocks_dir,
                torch_threads=params.torch_threads,
                devices=devices,
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
    from mobiquant.calibration.config import linear_weight_tuples, precision_weight_tuple

    weights, clip, tuning = params.precision_weights, params.clip_search_weights, params.end_to_end_weights
    chosen = {name: getattr(params, name)
              for name in ("damp", "descent_sweeps", "end_to_end_steps", "end_to_end_lr", "end_to_end_dtype",
                           "end_to_end_schedule")
              if getattr(params, name) is not None}
    return CalibrationConfig(
        num_slices=params.num_slices,
        group_size=params.group_size,
        router_hidden=params.router_hidden,
        epochs_stage1=params.epochs_stage1,
        epochs_stage2=params.epochs_stage2,
        mode=params.mode,
        seed=params.seed,
        compute_dtype=params.compute_dtype,
        precision_weights=None if weights is None else precision_weight_tuple(weights, params.num_slices),
        clip_search_weights=None if clip is None else precision_weight_tuple(clip, params.num_slices),
        end_to_end_weights=None if tuning is None else precision_weight_tuple(tuning, params.num_slices),
        module_precision_weights=linear_weight_tuples(params.module_precision_weights, params.num_slices),
        module_clip_search_weights=linear_weight_tuples(params.module_clip_search_weights, params.num_slices),
        loss_weighted_hessians=params.loss_weighted_hessians,
        **chosen,
    ).to_dict()


def config_digests(config: dict[str, Any]) -> tuple[str, str]:
    """The blocks' settings hash and the finished model's (the blocks' and the end-to-end stage's)."""
    from mobiquant.calibration import CalibrationConfig

    calibration = CalibrationConfig.from_dict(config)
    return calibration.digest(), calibration.model_digest()


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
    precision_weights: dict[int, float] | None = None,
    clip_search_weights: dict[int, float] | None = None,
    module_precision_weights: dict[str, dict[int, float]] | None = None,
    module_clip_search_weights: dict[str, dict[int, float]] | None = None,
    damp: float | None = None,
    descent_sweeps: int | None = None,
    end_to_end_steps: int | None = None,
    end_to_end_weights: dict[int, float] | None = None,
    end_to_end_lr: float | None = None,
    end_to_end_dtype: Literal["float32", "bfloat16"] | None = None,
    end_to_end_schedule: Literal["all", "rotate"] | None = None,
    loss_weighted_hessians: bool = True,
    seed: int = 0,
    budgets: list[float] | None = None,
    eval_seqlen: int = 256,
    eval_max_windows: int | None = None,
    eval_task_include_path: str | None = None,
    eval_task_limit: int | None = None,
    gate: GateThresholds | None = None,
    publish: PublishTarget | None = None,
    mlflow_uri: str = "sqlite:///mlflow.db",
    registered_model_name: str | None = None,
    work_dir: str = ".mobiquant-work",
    runner: RunnerKind = "thread",
    workers: int = 2,
    dask_address: str | None = None,
    torch_threads: int = 1,
    device: str = "auto",
    float32_inputs: bool = False,
    compute_dtype: Literal["float32", "tfloat32", "bfloat16"] = "float32",
    kernel_archs: list[str] | None = None,
) -> dict[str, Any]:
    """Compress ``model`` into one elastic MoBiQuant checkpoint and stage it for review.

    An expected failure, already explained in one line (:data:`EXPECTED_ERRORS`: a failed gate, a refused publish,
    an unusable parameter or service), ends the run in a Failed state whose message is that line, and Prefect logs
    it without a traceback; calling the flow still raises the error. Any other error keeps Prefect's traceback, as
    every error does with ``MOBIQUANT_DEBUG=1``."""
    wall_start = time.perf_counter()
    given = {k: v for k, v in locals().items() if v is not None and k != "wall_start"}
    quiet_expected_errors()
    try:
        return _compress(given, wall_start)
    except EXPECTED_ERRORS as error:
        if os.environ.get("MOBIQUANT_DEBUG"):
            raise
        # Prefect's documented way to fail a run with a message: return a Failed state. It logs "Finished in state
        # Failed('<message>')" where a raised exception would be logged with its traceback, and its caller gets
        # the error (the state's data) raised.
        return Failed(message=str(error), data=error)


def _compress(given: dict[str, Any], wall_start: float) -> dict[str, Any]:
    params = preflight(parse_params(given))
    logger = get_run_logger()

    work = Path(params.work_dir).expanduser().resolve()
    stage_times: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    source = calibration.download(params.model, params.revision, str(work / "sources"))
    _timed(stage_times, "download", started, source["seconds"])
    logger.info("source %s (%s) at sha %s", source["source"], source["kind"], source["sha"])

    config = params_config(params)
    # Blocks are keyed by their own settings, so runs differing only in the end-to-end stage share them.
    digest, model_digest = config_digests(config)
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
        config=config,
        device=params.device,
        source_model=source,
        float32_inputs=params.float32_inputs,
    )
    _timed(stage_times, "capture", started, captured["seconds"])

    # Each result records its resume key (model sha, samples, input dtype, config): a re-run of a killed run finds
    # them here and recomputes only what is missing or was computed under another key.
    blocks_dir = work / "blocks" / source["sha"][:16] / f"{digest}-{data_key.replace(':', '_')}"
    started = time.perf_counter()
    blocks = calibrate_blocks.with_options(task_runner=task_runner_for(params))(
        source["path"], str(capture_dir), captured["num_blocks"], params, str(blocks_dir)
    )
    fresh = [b for b in blocks if not b.get("cached")]
    span = max(b["finished"] for b in blocks) - min(b["started"] for b in blocks) if fresh else 0.0
    _timed(stage_times, "calibrate", started, span)
    logger.info("%d blocks calibrated (%d reused from an earlier run)", len(blocks), len(blocks) - len(fresh))
    unreached = unreached_linears(blocks)
    if unreached:
        # The library says so in the block's task run log as it calibrates (tasks/run_log.py), not when the blocks are
        # reused: this line names them on every run.
        logger.warning("no calibration token reached %s: their codes minimise the weight error alone and their "
                       "routers are constant (more calibration samples reach more experts)", unreached)

    run_dir = work / "runs" / f"{source['sha'][:16]}-{model_digest}"
    # Two runs of the same model and configuration share run_dir (same sha, same config hash): the second
    # waits here, then redoes the cheap steps from the blocks the first left, instead of mixing files with it.
    with file_lock(run_dir.parent / f"{run_dir.name}.lock"):
        started = time.perf_counter()
        checkpoint = calibration.checkpoint(
            source["path"],
            str(capture_dir),
            [b["path"] for b in blocks],
            config,
            captured["samples_path"],
            str(run_dir / "checkpoint"),
            params.device,
        )
        _timed(stage_times, "checkpoint", started, checkpoint["seconds"])
        if checkpoint["reused"]:
            logger.info("checkpoint %s reused: built from the same blocks and samples by an earlier run",
                        checkpoint["path"])
        started = time.perf_counter()
        kernels = calibration.compile_kernels(params.kernel_archs, str(run_dir / "kernels"))
        _timed(stage_times, "kernels", started, kernels["seconds"])
        started = time.perf_counter()
        validation, checks, passed = release.validate(
            source["path"], source["sha"], checkpoint, params, str(run_dir / "validation.json")
        )
        if validation["reused"]:
            logger.info("validation reused: the same checkpoint was measured on the same tokens by an earlier run")
        _timed(stage_times, "validate", started, validation["seconds"])

        run_name = flow_run.get_name() or f"compress-{source['sha'][:8]}"
        outcome = release.report(
            params,
            str(run_dir),
            run_name,
            source,
            checkpoint,
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
            "mlflow_uri": tracking.redacted_uri(params.mlflow_uri),
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


# Prefect defaults for a run started from a command line with no Prefect server (``python -m flows.compress``,
# ``python -m flows.demo``). Defaults, not overrides: what the user set (environment or Prefect profile) wins.
# They go through Prefect's settings context: Prefect reads ``os.environ`` once, when it is first imported.
LOCAL_PREFECT_DEFAULTS: dict[str, Any] = {
    # No API URL configured: run on Prefect's ephemeral server (PREFECT_SERVER_ALLOW_EPHEMERAL_MODE).
    "server.ephemeral.enabled": True,
    # Prefect waits 20 s for that server by default; on a small machine busy with other work it can take longer
    # (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS).
    "server.ephemeral.startup_timeout_seconds": 120,
    # The ephemeral server's telemetry heartbeat writes to the same sqlite file as the starting run and, when it
    # loses that race, prints a "database is locked" traceback; it would also try to reach Prefect's servers
    # (PREFECT_SERVER_ANALYTICS_ENABLED).
    "server.analytics_enabled": False,
}
DEPLOYMENTS_FILE = Path(__file__).resolve().parent.parent / "prefect.yaml"


def deployment_parameters(name: str, deployments_file: Path = DEPLOYMENTS_FILE) -> dict[str, Any]:
    """The parameters of the ``compress`` deployment ``name`` in ``prefect.yaml`` (one source of truth for every
    entry point)."""
    spec = yaml.safe_load(deployments_file.read_text())
    found = {d["name"]: d.get("parameters", {}) for d in spec["deployments"]
             if d.get("entrypoint") == "flows/compress.py:compress"}
    if name not in found:
        raise InvalidParametersError(
            f"no compress deployment {name!r} in {deployments_file} (there: {', '.join(found)})")
    return copy.deepcopy(found[name])


def merged(params: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` over ``params``: a mapping given where ``params`` holds one is merged into it key by key (a publish
    ``root`` alone keeps the deployment's ``kind``); anything else replaces. ``--set KEY={...}`` replaces a mapping
    whole."""
    result = copy.deepcopy(params)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def with_overrides(params: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """``params`` with each ``KEY=VALUE`` applied; VALUE is YAML (``8``, ``[3, 4]``, ``{kind: local}``) and a dotted
    KEY (``publish.root=out``) sets one field of a nested parameter."""
    params = copy.deepcopy(params)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise InvalidParametersError(f"--set {assignment!r}: expected KEY=VALUE")
        *parents, leaf = key.split(".")
        target = params
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise InvalidParametersError(f"--set {assignment!r}: {part} is not a mapping")
        try:
            target[leaf] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise InvalidParametersError(f"--set {assignment!r}: the value is not YAML ({error.problem})") from error
    return params


def run_locally(params: dict[str, Any], prog: str) -> int:
    """Run ``compress(**params)`` in this process, as a command line does: the parameters and services are checked
    before Prefect starts a run, an expected failure is one line on stderr and exit status 1, and a finished run
    prints where its checkpoint, report, release and MLflow version are. Any other error propagates."""
    with temporary_settings(set_defaults=LOCAL_PREFECT_DEFAULTS):
        try:
            preflight(parse_params(params))
            summary = compress(**params)
        except EXPECTED_ERRORS as error:
            # Prefect has logged a failed run in one line (its state's message); the report or the publish target
            # says the rest. A service lost after the check fails the flow's own preflight the same way.
            print(f"{prog}: error: {error}", file=sys.stderr)
            return 1
    db = summary["mlflow_uri"]
    print()
    print(f"checkpoint:   {summary['checkpoint']}")
    print(f"report:       {summary['report']}")
    publish = params.get("publish") or {}
    if publish.get("kind", "local") == "local" and publish.get("root"):
        print(f"staged:       {Path(publish['root']) / summary['repo_id'] / 'staging'}")
    else:
        print(f"staged:       {summary['repo_id']}@{publish.get('staging_branch', 'staging')}")
    print(f"MLflow:       {summary['registered_model']} version {summary['version']} (alias candidate)")
    print(f"MLflow UI:    mlflow ui --backend-store-uri {db}")
    print(f"promote:      python -m flows.promote {summary['registered_model']} --reviewer NAME --mlflow-uri {db}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """``python -m flows.compress``'s options."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.compress",
        description="Run the compress flow in this process with a deployment's parameters from prefect.yaml, "
        "on the Prefect server of PREFECT_API_URL or, with none, Prefect's ephemeral server.",
    )
    parser.add_argument("--deployment", default="llama",
                        help="start from this deployment's parameters in prefect.yaml (default: %(default)s)")
    parser.add_argument("--params", type=Path, metavar="FILE",
                        help="a YAML or JSON mapping of parameters, applied over the deployment's (a nested "
                        "mapping key by key)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="assignments",
                        help="one parameter, applied last; VALUE is YAML, a dotted KEY sets a nested field "
                        "(--set model=org/name --set samples=64 --set publish.kind=local); repeatable")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "mobiquant compress"
    try:
        params = deployment_parameters(args.deployment)
        if args.params is not None:
            given = yaml.safe_load(args.params.read_text())
            if not isinstance(given, dict):
                raise InvalidParametersError(f"--params {args.params}: expected a mapping of parameters")
            params = merged(params, given)
        params = with_overrides(params, args.assignments)
    except (InvalidParametersError, OSError, yaml.YAMLError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    return run_locally(params, prog)


if __name__ == "__main__":
    sys.exit(main())
