"""Tasks from a model reference to a calibrated MoBiQuant checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext

from registry import stages


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


def block_cache_key(context: TaskRunContext, inputs: dict[str, Any]) -> str | None:
    """Key a block by (model sha, block index, config hash), but only once its result file exists.

    Without the file there is nothing to reuse (a deleted result must be recomputed, not served from
    Prefect's result store); with it, a re-run skips the task entirely.
    """
    if not Path(inputs["out_path"]).exists():
        return None
    return f"mobiquant-block-{inputs['model_sha']}-{inputs['block_index']}-{inputs['config_digest']}"


@task(name="calibrate-block", cache_key_fn=block_cache_key, persist_result=True)
def calibrate_block(
    model_dir: str,
    model_sha: str,
    block_index: int,
    capture_dir: str,
    config: dict[str, Any],
    config_digest: str,
    out_path: str,
    torch_threads: int = 1,
) -> dict[str, Any]:
    return stages.calibrate_block(
        Path(model_dir), block_index, Path(capture_dir), config, Path(out_path), torch_threads
    )


@task(name="assemble")
def assemble(model_dir: str, block_paths: list[str], config: dict[str, Any], out_dir: str) -> dict[str, Any]:
    return stages.assemble(Path(model_dir), block_paths, config, Path(out_dir))


@task(name="router-thresholds")
def thresholds(assembled_dir: str, samples_path: str, out_dir: str) -> dict[str, Any]:
    return stages.thresholds(Path(assembled_dir), Path(samples_path), Path(out_dir))


@task(name="compile-kernels")
def compile_kernels(archs: list[str], out_dir: str) -> dict[str, Any]:
    return stages.compile_kernels(archs, Path(out_dir))
