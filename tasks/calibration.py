"""Tasks from a model reference to a calibrated MoBiQuant checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import Task, get_run_logger, task
from prefect.client.schemas.objects import State, TaskRun

from tasks import stages


def _hub_unavailable(_task: Task[..., Any], _task_run: TaskRun, state: State[Any]) -> bool:
    """Retry only an unreachable or failing Hub: a missing repo, a refused token or a bad file stays bad."""
    from mobiquant.sources import HubUnavailableError

    return isinstance(state.result(raise_on_failure=False), HubUnavailableError)


@task(name="download", retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=_hub_unavailable)
def download(model: str, revision: str | None, cache_dir: str) -> dict[str, Any]:
    """Materialize the source (hub snapshot pinned to its resolved sha, local folder or GGUF)."""
    return stages.download(model, revision, Path(cache_dir))


@task(name="capture-block-inputs")
def capture(model_dir: str, capture_dir: str, **options: Any) -> dict[str, Any]:
    return stages.capture(Path(model_dir), Path(capture_dir), **options)


@task(name="calibrate-block")
def calibrate_block(
    model_dir: str,
    block_index: int,
    capture_dir: str,
    config: dict[str, Any],
    blocks_dir: str,
    torch_threads: int,
    devices: list[str],
) -> dict[str, Any]:
    """One block; a result already saved under the same resume key is returned without recomputing."""
    return stages.calibrate_block(
        Path(model_dir), block_index, Path(capture_dir), config, Path(blocks_dir), torch_threads, devices
    )


@task(name="checkpoint")
def checkpoint(
    model_dir: str,
    capture_dir: str,
    block_paths: list[str],
    config: dict[str, Any],
    samples_path: str,
    out_dir: str,
    device: str,
) -> dict[str, Any]:
    """Assemble, tune end to end where asked, set the router thresholds and save; an intact checkpoint of the same
    inputs is returned as is."""
    logger = get_run_logger()

    def log_step(done: int, steps: int, loss: float) -> None:
        logger.info("end-to-end tuning: step %d/%d, loss %.4g", done, steps, loss)

    return stages.checkpoint(
        Path(model_dir), Path(capture_dir), block_paths, config, Path(samples_path), Path(out_dir), device, log_step
    )


@task(name="compile-kernels")
def compile_kernels(archs: list[str], out_dir: str) -> dict[str, Any]:
    return stages.compile_kernels(archs, Path(out_dir))
