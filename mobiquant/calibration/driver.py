"""The one calibration driver: what ``mobiquant quantize``, the Python API and the pipeline's tasks all call.

A run is four steps over files, each resumable:

1. :func:`capture_block_inputs` writes every block's full-precision inputs (one block in memory at a time)
   and every token's loss saliency at every linear;
2. :func:`calibrate_one_block` calibrates one block from its captured inputs and saves the result under the
   resume key; in sequential mode it also writes the next block's quantized inputs. The pipeline runs it as
   one task per block, :func:`calibrate_blocks` runs it in a loop;
3. :func:`assemble` builds the packed elastic model from the source's files and the block results; with
   ``end_to_end_steps``, :func:`tune_assembled` then trains its group parameters through the whole model
   (:mod:`mobiquant.calibration.end_to_end`) and fits the routers again to the tuned weights;
4. :func:`finish` sets the quantization config (one builder, with the capture's provenance) and the router
   thresholds. :func:`finished_model` is steps 3 and 4 on one device, for a model calibrated from files.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mobiquant.calibration.block import ProgressCallback, calibrate_block, compute_precision, quantized_block
from mobiquant.calibration.capture import DTYPES, block_outputs, capture_block_inputs, check_windows
from mobiquant.calibration.config import SEQUENTIAL_PROPAGATION_SLICES, CalibrationConfig, quantization_config
from mobiquant.calibration.end_to_end import (
    TEACHER_FILE,
    TEACHER_TOP_K,
    StepCallback,
    stage_key,
    tune_end_to_end,
    write_teacher,
)
from mobiquant.calibration.routers import refit_routers
from mobiquant.calibration.saliency import read_token_saliency
from mobiquant.calibration.store import (
    KWARGS_FILE,
    atomic_save,
    fp_input_path,
    load_block_kwargs,
    load_block_result,
    load_hidden,
    quantized_input_path,
    read_manifest,
    read_result_report,
    readable_metadata,
    result_is_complete,
    result_path,
    resume_key,
    save_block_result,
)
from mobiquant.checkpoint import CheckpointError, attach_quantizer, refuse_quantized, replace_linears
from mobiquant.devices import check_bf16_products
from mobiquant.model_files import BlockSource, InMemoryModel, ModelFiles, skeleton
from mobiquant.slicing import check_slicing_shape
from mobiquant.sources import file_sha256

# In a run's work folder: held by the one calibration using the folder.
LOCK_FILE = "calibration.lock"
# In a run's work folder: the end-to-end stage's teacher and saved state.
END_TO_END_DIR = "end-to-end"


class WorkFolderInUse(OSError):
    """The work folder is held by another calibration running now."""


@contextmanager
def work_folder_lock(work_dir: Path) -> Iterator[None]:
    """Hold ``work_dir`` for this calibration alone, or raise :class:`WorkFolderInUse` at once.

    Block results and captures are stored by block index whatever the settings: two runs on one folder would
    assemble each other's blocks. ``flock`` is released when its process dies, so a killed run blocks nothing.
    A folder is removed by moving it aside under its lock first (:func:`remove_work_folder`), so a lock taken on
    a file that is no longer the folder's own is refused too.
    """
    work_dir = Path(work_dir)
    busy = (f"work folder {work_dir} is in use by another calibration running now: wait for it, or give this run "
            "its own work folder (--work-dir, or work_dir=)")
    work_dir.mkdir(parents=True, exist_ok=True)
    lock_path = work_dir / LOCK_FILE
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise WorkFolderInUse(busy) from error
        try:
            current = lock_path.stat().st_ino
        except FileNotFoundError:
            current = None
        if current != os.fstat(handle.fileno()).st_ino:
            raise WorkFolderInUse(busy)
        yield


def remove_work_folder(work_dir: Path) -> bool:
    """Delete ``work_dir`` unless a calibration holds it now (then False). It is renamed aside under its lock
    before its files go: a calibration starting meanwhile gets a new folder, never one being emptied."""
    work_dir = Path(work_dir)
    doomed = work_dir.with_name(f".{work_dir.name}.removing-{os.getpid()}")
    try:
        with work_folder_lock(work_dir):
            work_dir.rename(doomed)
    except WorkFolderInUse:
        return False
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def check_config(source: BlockSource, config: CalibrationConfig) -> None:
    """Fail before any heavy work on settings this model cannot take."""
    check_group_size(source, config.group_size)
    config.check_linear_names(source.arch)


def check_device_settings(config: CalibrationConfig, device: torch.device) -> None:
    """Fail before any heavy work on settings ``device`` cannot run well."""
    if config.end_to_end_steps and config.end_to_end_dtype == "bfloat16":
        check_bf16_products(device, "end_to_end_dtype bfloat16")


def check_group_size(source: BlockSource, group_size: int) -> None:
    """Fail before any heavy work if a quantized linear cannot be sliced with ``group_size``."""
    for name, linear in source.arch.quantized_linears(source.block_structure(0)).items():
        try:
            check_slicing_shape(linear.in_features, group_size)
        except ValueError as error:
            raise ValueError(f"block 0 {name}: {error}") from error


def calibrate_one_block(
    source: BlockSource,
    index: int,
    capture_dir: Path,
    config: CalibrationConfig,
    blocks_dir: Path,
    device: torch.device,
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Calibrate block ``index`` from its captured inputs and save it; a result under the same key is reused.

    Returns a report (losses, seconds, device, sha256 of the result, ``cached``). In sequential mode the
    next block's quantized inputs are written too, also when the result itself is reused and they are missing or
    unreadable.
    """
    capture_dir = Path(capture_dir)
    manifest = read_manifest(capture_dir)
    key = resume_key(manifest, config)
    out_path = result_path(blocks_dir, index)
    store_dtype = DTYPES[manifest["dtype"]]
    needs_next = config.mode == "sequential" and index + 1 < source.num_blocks
    next_inputs = quantized_input_path(capture_dir, index + 1, key)
    cached = result_is_complete(out_path, key, index)
    if cached and not (needs_next and readable_metadata(next_inputs) is None):
        return {**read_result_report(out_path), "cached": True}
    block = source.block(index, device)
    block_kwargs = load_block_kwargs(capture_dir / KWARGS_FILE, device).for_block(index)
    fp_inputs = load_hidden(fp_input_path(capture_dir, index))
    inputs, targets = fp_inputs, None
    if config.mode == "sequential" and index > 0:
        quantized_inputs = quantized_input_path(capture_dir, index, key)
        if not quantized_inputs.exists():
            raise FileNotFoundError(f"sequential mode: block {index - 1} has not been calibrated yet")
        inputs = load_hidden(quantized_inputs)
        with compute_precision(config, device):
            targets = block_outputs(block, fp_inputs, block_kwargs, config.batch_size, torch.float32)
    if not cached:
        weights, positions = read_token_saliency(capture_dir, index) if config.loss_weighted_hessians else (None, None)
        result = calibrate_block(block, inputs, block_kwargs, source.arch, config, targets, index, progress,
                                 on_progress, weights, positions)
        save_block_result(result.state, result.losses, result.seconds, out_path, config, key, index, str(device),
                          result.unreached)
    if needs_next:
        state = load_block_result(out_path)
        quantized = quantized_block(block, source.arch, {k: v.to(device) for k, v in state.items()}, config)
        for layer in source.arch.quantized_linears(quantized).values():
            layer.uniform_slices = min(SEQUENTIAL_PROPAGATION_SLICES, config.num_slices)
        outputs = block_outputs(quantized, inputs, block_kwargs, config.batch_size, store_dtype)
        atomic_save({"hidden": outputs}, next_inputs, {"block": str(index + 1)})
    return {**read_result_report(out_path), "cached": cached}


def calibrate_blocks(
    source: BlockSource,
    capture_dir: Path,
    config: CalibrationConfig,
    blocks_dir: Path,
    device: torch.device,
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
) -> list[dict[str, Any]]:
    """Every block in order, in this process (the pipeline runs :func:`calibrate_one_block` as tasks instead)."""
    reports = []
    bar = tqdm(total=source.num_blocks, desc="calibrating blocks", unit="block", disable=not progress)
    for index in range(source.num_blocks):
        report = calibrate_one_block(source, index, capture_dir, config, blocks_dir, device, progress, on_progress)
        reports.append(report)
        stage2 = report["losses"]["stage2"]
        # Blocks reused from an earlier run so far, not this block's flag: a resumed run says what it kept.
        reused = sum(bool(r["cached"]) for r in reports)
        bar.set_postfix(loss=f"{stage2[-1] if stage2 else 0:.3e}", reused=reused, refresh=False)
        bar.update(1)
    bar.close()
    return reports


def assemble(files: ModelFiles, block_paths: Mapping[int, Path], config: CalibrationConfig) -> torch.nn.Module:
    """The packed elastic model: the source's other tensors (source dtype) and every block's MoBiLinear state.

    Built on the meta device and filled tensor by tensor: the full-precision blocks are never loaded.
    """
    missing = sorted(set(range(files.num_blocks)) - set(block_paths))
    if missing:
        raise ValueError(f"no calibration result for blocks {missing}")
    arch = files.arch
    model = skeleton(files.config, files.source_dtype)
    replace_linears(model, arch, config.num_slices, config.group_size,
                    config.router_hidden if config.routed else None)
    # A set lookup per tensor: a 128-expert model has 18k quantized linears.
    quantized = {f"{arch.block_prefix(i)}{name}" for i in range(files.num_blocks) for name in arch.linears}
    kept = [name for name in files.expected_tensors() if name.rpartition(".")[0] not in quantized]
    state = files.read(kept)
    for index, path in block_paths.items():
        prefix = arch.block_prefix(index)
        state.update({f"{prefix}{key}": tensor for key, tensor in load_block_result(Path(path)).items()})
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if empty:
        raise CheckpointError(f"assembled model lacks {len(empty)} tensors, e.g. {empty[0]}")
    for block in arch.block_list(model):
        for layer in arch.quantized_linears(block).values():
            if layer.bias is not None:
                layer.bias = layer.bias.to(layer.compute_dtype)
    return model.eval()


def apply_block_results(model: torch.nn.Module, block_paths: Mapping[int, Path],
                        config: CalibrationConfig) -> torch.nn.Module:
    """An in-memory model with its quantized linears replaced by MoBiLinear layers holding the block results."""
    source = InMemoryModel(model)
    for index, block in enumerate(source.arch.block_list(model)):
        quantized_block(block, source.arch, load_block_result(Path(block_paths[index])), config)
    return model


def write_teacher_if_tuned(source: BlockSource, capture_dir: Path, samples: torch.Tensor,
                           config: CalibrationConfig, stage_dir: Path, device: torch.device) -> Path | None:
    """The end-to-end stage's teacher file (the full-precision model's top next-token log-probabilities), written
    from the capture unless there already; None where the stage is off. An in-memory source's blocks must still be
    full precision."""
    if not config.end_to_end_steps:
        return None
    return write_teacher(source, capture_dir, samples, Path(stage_dir) / TEACHER_FILE, TEACHER_TOP_K, device,
                         config.batch_size)


def tune_assembled(model: torch.nn.Module, teacher: Path | None, block_hashes: Mapping[int, str],
                   samples: torch.Tensor, config: CalibrationConfig, stage_dir: Path, progress: bool = True,
                   on_step: StepCallback | None = None) -> dict[str, Any] | None:
    """The end-to-end stage on the assembled ``model`` (on its device), resumable from ``stage_dir`` under a key of
    the block results' sha256s ``block_hashes``, then the routers fitted anew to the tuned weights (the blocks fitted
    them to the weights before the stage); its report, or None where it is off (``teacher`` None)."""
    if teacher is None:
        return None
    key = stage_key(config, block_hashes, samples, TEACHER_TOP_K)
    report = tune_end_to_end(model, samples, teacher, config, stage_dir, key, progress, on_step)
    if config.routed:
        refit_routers(model, samples, config.batch_size, config.seed, progress)
    return report


def finish(model: torch.nn.Module, samples: torch.Tensor, config: CalibrationConfig,
           provenance: Mapping[str, Any] | None = None, progress: bool = False) -> torch.nn.Module:
    """Record the quantization config and calibrate the router thresholds on ``samples`` (model's device); the
    model then saves (``save_pretrained``, ``push_to_hub``) as a loaded checkpoint does."""
    from mobiquant.arch import architecture_of
    from mobiquant.precision import calibrate_thresholds

    model.config.quantization_config = quantization_config(config, architecture_of(model.config), provenance)
    if config.routed:
        calibrate_thresholds(model, samples, progress=progress)
    return attach_quantizer(model.eval())


def finished_model(files: ModelFiles, block_paths: Mapping[int, Path], config: CalibrationConfig,
                   samples: torch.Tensor, device: torch.device, provenance: Mapping[str, Any] | None = None,
                   progress: bool = False, capture_dir: Path | None = None, stage_dir: Path | None = None,
                   on_step: StepCallback | None = None,
                   block_hashes: Mapping[int, str] | None = None) -> torch.nn.Module:
    """The elastic model from the source's files and the block results, on ``device``, tuned end to end where
    ``config`` asks (from the capture in ``capture_dir``, resumable in ``stage_dir``; ``block_hashes``, the results'
    sha256s where the caller has them, else read here), thresholds set on ``samples``: what ``quantize_files``
    returns and the pipeline saves."""
    model = assemble(files, block_paths, config).to(device)
    if config.end_to_end_steps:
        if capture_dir is None or stage_dir is None:
            raise ValueError("end-to-end tuning needs the capture folder and a folder for its stage")
        teacher = write_teacher_if_tuned(files, capture_dir, samples, config, stage_dir, device)
        hashes = block_hashes or {index: file_sha256(Path(path)) for index, path in block_paths.items()}
        tune_assembled(model, teacher, hashes, samples, config, stage_dir, progress, on_step)
    return finish(model, samples, config, provenance, progress)


def quantize_files(
    model_dir: Path,
    samples: torch.Tensor,
    config: CalibrationConfig,
    work_dir: Path,
    *,
    model_key: str,
    device: torch.device,
    provenance: Mapping[str, Any] | None = None,
    store_dtype: torch.dtype | None = None,
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
) -> torch.nn.Module:
    """The whole calibration of the model folder ``model_dir`` in this process; resumes from ``work_dir``.

    One calibration at a time per ``work_dir``: another one using it now makes this one fail at once
    (:class:`WorkFolderInUse`).
    """
    files = ModelFiles(model_dir)
    files.check()
    check_config(files, config)
    check_device_settings(config, device)
    # Before the work folder is taken: refused settings leave nothing behind.
    check_windows(files, samples)
    capture_dir, blocks_dir = Path(work_dir) / "capture", Path(work_dir) / "blocks"
    with work_folder_lock(work_dir):
        capture_block_inputs(files, samples, capture_dir, device=device, model_key=model_key,
                             store_dtype=store_dtype, provenance=dict(provenance or {}),
                             batch_size=config.batch_size, progress=progress)
        reports = calibrate_blocks(files, capture_dir, config, blocks_dir, device, progress, on_progress)
        block_paths = {r["block"]: Path(r["path"]) for r in reports}
        return finished_model(files, block_paths, config, samples, device, provenance, progress, capture_dir,
                              Path(work_dir) / END_TO_END_DIR, block_hashes={r["block"]: r["sha256"] for r in reports})


def quantize_model(
    model: torch.nn.Module,
    samples: torch.Tensor,
    config: CalibrationConfig,
    work_dir: Path,
    device: torch.device | str | None = None,
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
) -> torch.nn.Module:
    """Calibrate an in-memory ``model`` and return it with MoBiLinear layers and calibrated thresholds.

    Every finished block is saved under ``work_dir``; calling again with the same work directory and
    configuration resumes, recomputing only the unfinished blocks; another calibration using the work directory
    now makes this one fail at once (:class:`WorkFolderInUse`). Blocks calibrate on ``device`` (default: the
    model's own device).
    """
    refuse_quantized(model)
    source = InMemoryModel(model)
    check_config(source, config)
    compute_device = torch.device(device) if device is not None else next(model.parameters()).device
    check_device_settings(config, compute_device)
    # Before the work folder is taken: refused settings leave nothing behind.
    check_windows(source, samples)
    capture_dir, blocks_dir = Path(work_dir) / "capture", Path(work_dir) / "blocks"
    with work_folder_lock(work_dir):
        capture_block_inputs(source, samples, capture_dir, device=compute_device, model_key=source.fingerprint(),
                             store_dtype=torch.float32, batch_size=config.batch_size, progress=progress)
        reports = calibrate_blocks(source, capture_dir, config, blocks_dir, compute_device, progress, on_progress)
        block_paths = {r["block"]: Path(r["path"]) for r in reports}
        stage_dir = Path(work_dir) / END_TO_END_DIR
        # Before the blocks are replaced: the teacher is the full-precision model.
        teacher = write_teacher_if_tuned(source, capture_dir, samples, config, stage_dir, compute_device)
        model = apply_block_results(model.float(), block_paths, config)
        tune_assembled(model, teacher, {r["block"]: r["sha256"] for r in reports}, samples, config, stage_dir,
                       progress)
    return finish(model, samples, config, progress=progress)
