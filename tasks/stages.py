"""The pipeline's stages as plain functions over paths: what each Prefect task calls.

Every stage reads its inputs from files and writes its outputs to files, returning small JSON-able
dictionaries (paths, hashes, numbers), so the same code runs in a thread, another process or a Dask
worker. Outputs are written beside their final place and renamed into it: a crash or a full disk
leaves the old state or the new one, never half of a checkpoint (``save_checkpoint`` is atomic too).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from flows.params import SMOLLM2_ALIAS, SMOLLM2_BASE_MODEL
from registry.hashing import manifest_digest, tree_manifest

SAMPLES_FILE = "samples.safetensors"


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock: two runs of the same model and configuration share work, not files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def source_metadata(model: str, source: Any) -> dict[str, Any]:
    """License and base model of the source, for the model card (None where unknown)."""
    from huggingface_hub import HfApi, ModelCard
    from huggingface_hub.errors import HfHubHTTPError

    license_id = None
    readme = Path(source.path) / "README.md"
    if readme.is_file():
        license_id = ModelCard.load(readme).data.license
    base_model = source.source if source.kind == "hub" else None
    if source.kind == "hub" and license_id is None:
        try:
            card = HfApi().model_info(source.source, revision=source.sha).card_data
        except HfHubHTTPError:
            card = None
        license_id = card.license if card is not None else None
    if model == SMOLLM2_ALIAS:
        # Released under Apache-2.0.
        base_model, license_id = SMOLLM2_BASE_MODEL, license_id or "apache-2.0"
    return {"license": license_id, "base_model": base_model}


def download(model: str, revision: str | None, cache_dir: Path) -> dict[str, Any]:
    """The source model as a local folder pinned to a content sha (hub commit, file or folder hash)."""
    from mobiquant.sources import materialize, smollm2_gguf_path

    start = time.perf_counter()
    reference = str(smollm2_gguf_path()) if model == SMOLLM2_ALIAS else model
    source = materialize(reference, revision=revision, cache_dir=cache_dir)
    return {
        "path": str(source.path),
        "sha": source.sha,
        "kind": source.kind,
        "source": model if model == SMOLLM2_ALIAS else source.source,
        **source_metadata(model, source),
        "seconds": time.perf_counter() - start,
    }


def capture(
    model_dir: Path,
    capture_dir: Path,
    *,
    calibration_data: str,
    samples: int,
    seqlen: int,
    seed: int,
    config: dict[str, Any],
    device: str,
    source_model: dict[str, Any],
    float32_inputs: bool = False,
) -> dict[str, Any]:
    """Calibration samples and the full-precision inputs of every block, captured once per (model, data).

    One block is in memory at a time; block inputs are stored in the source dtype unless ``float32_inputs``.
    """
    from mobiquant.calibration import CalibrationConfig
    from mobiquant.calibration.capture import capture_block_inputs
    from mobiquant.calibration.driver import check_config
    from mobiquant.data import calibration_samples
    from mobiquant.devices import resolve_device
    from mobiquant.model_files import ModelFiles
    from mobiquant.sources import check_tokenizer, load_tokenizer

    start = time.perf_counter()
    # Every check on the inputs runs before the first file is written: bad input leaves the work folder as it was.
    files = ModelFiles(model_dir)
    files.check()
    check_config(files, CalibrationConfig.from_dict(config))
    tokenizer = load_tokenizer(model_dir)
    check_tokenizer(tokenizer, files.config)
    ids = calibration_samples(tokenizer, calibration_data, samples, seqlen, seed)
    provenance = {
        "calibration_data": {"source": calibration_data, "samples": samples, "seqlen": seqlen, "seed": seed},
        "source_model": {k: source_model.get(k) for k in ("source", "kind", "sha")},
    }
    with file_lock(capture_dir.parent / f"{capture_dir.name}.lock"):
        capture_dir.mkdir(parents=True, exist_ok=True)
        samples_path = capture_dir / SAMPLES_FILE
        # Rewritten whenever the drawn samples differ (the text changed under the same name): the thresholds stage
        # reads this file and must fit on the text the blocks were calibrated on.
        if not (samples_path.exists() and torch.equal(load_file(str(samples_path))["ids"], ids)):
            partial = samples_path.with_name(samples_path.name + ".partial")
            save_file({"ids": ids.contiguous()}, str(partial))
            partial.replace(samples_path)
        manifest = capture_block_inputs(
            files, ids, capture_dir, device=resolve_device(device), model_key=source_model["sha"],
            store_dtype=torch.float32 if float32_inputs else None, provenance=provenance,
        )
    return {
        "capture_dir": str(capture_dir),
        "samples_path": str(samples_path),
        "num_blocks": int(manifest["num_blocks"]),
        "dtype": manifest["dtype"],
        "seconds": time.perf_counter() - start,
    }


def calibrate_block(
    model_dir: Path,
    block_index: int,
    capture_dir: Path,
    config: dict[str, Any],
    blocks_dir: Path,
    torch_threads: int,
    devices: list[str],
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """One block (layer-parallel unit of work) on a leased device; returns losses, timings and the result's sha256."""
    from mobiquant.calibration import CalibrationConfig, calibrate_one_block
    from mobiquant.devices import lease_device, resolve_device
    from mobiquant.model_files import ModelFiles

    # Each worker gets its own share of the cores; oversubscription slows every block down.
    torch.set_num_threads(torch_threads)
    started = time.time()
    out_lock = blocks_dir / f"block_{block_index:04d}.lock"
    # "auto" on a Dask GPU worker is the one GPU the worker sees.
    choices = [str(resolve_device(d)) for d in devices]
    with file_lock(out_lock), lease_device(choices, blocks_dir.parent / "device-leases") as device:
        report = calibrate_one_block(
            ModelFiles(model_dir),
            block_index,
            Path(capture_dir),
            CalibrationConfig.from_dict(config),
            Path(blocks_dir),
            torch.device(device),
            progress=False,
            on_progress=on_progress,
        )
    return {**report, "started": started, "finished": time.time()}


def checkpoint(model_dir: Path, capture_dir: Path, block_paths: list[str], config: dict[str, Any],
               samples_path: Path, out_dir: Path, device: str,
               on_step: Callable[[int, int, float], None] | None = None) -> dict[str, Any]:
    """The final checkpoint from the calibrated blocks: assembled on ``device``, tuned end to end where the config
    asks (resumable in the ``end-to-end`` folder beside ``out_dir``; ``on_step`` hears of each step), router
    thresholds set on the calibration samples, saved once (the driver's ``finished_model``, as ``mobiquant
    quantize`` does).

    ``out_dir.key`` records what it was built from (source, samples, settings, every block result's hash)
    and the files written: a re-run with the same inputs and an intact folder returns it without rebuilding.
    """
    from mobiquant.calibration import CalibrationConfig, finished_model
    from mobiquant.calibration.driver import END_TO_END_DIR
    from mobiquant.calibration.end_to_end import stage_report
    from mobiquant.calibration.store import read_manifest, read_result_report
    from mobiquant.checkpoint import save_checkpoint
    from mobiquant.devices import resolve_device
    from mobiquant.model_files import ModelFiles
    from mobiquant.sources import file_sha256, load_tokenizer

    start = time.perf_counter()
    calibration = CalibrationConfig.from_dict(config)
    reports = [read_result_report(Path(p)) for p in block_paths]
    manifest = read_manifest(capture_dir)
    key = {
        "model": manifest["model"],
        "samples": file_sha256(samples_path),
        "config": calibration.model_digest(),
        "blocks": {str(r["block"]): r["sha256"] for r in sorted(reports, key=lambda r: r["block"])},
    }
    record = out_dir.with_name(out_dir.name + ".key")
    stage_dir = out_dir.with_name(END_TO_END_DIR)
    if record.exists():
        kept = json.loads(record.read_text())
        if out_dir.is_dir() and kept.get("key") == key and kept.get("files") == tree_manifest(out_dir):
            return {"path": str(out_dir), "files": kept["files"], "reused": True,
                    "seconds": time.perf_counter() - start,
                    "end_to_end": stage_report(stage_dir) if calibration.end_to_end_steps else None}
        # The record says this stage wrote the folder: a stale or damaged one goes, whatever is left of it.
        if out_dir.is_dir():
            shutil.rmtree(out_dir)
        record.unlink()
    model = finished_model(
        ModelFiles(model_dir),
        {r["block"]: Path(r["path"]) for r in reports},
        calibration,
        load_file(str(samples_path))["ids"],
        resolve_device(device),
        manifest.get("provenance", {}),
        capture_dir=Path(capture_dir),
        stage_dir=stage_dir,
        on_step=on_step,
        block_hashes={r["block"]: r["sha256"] for r in reports},
    )
    save_checkpoint(model, out_dir, tokenizer=load_tokenizer(model_dir), overwrite=True)
    files = tree_manifest(out_dir)
    partial = record.with_name(record.name + ".partial")
    partial.write_text(json.dumps({"key": key, "files": files}, indent=2))
    partial.replace(record)
    return {"path": str(out_dir), "files": files, "reused": False, "seconds": time.perf_counter() - start,
            "end_to_end": stage_report(stage_dir) if calibration.end_to_end_steps else None}


def compile_kernels(archs: list[str], out_dir: Path) -> dict[str, Any]:
    """NVRTC CUBINs per architecture (no GPU needed); a summary of what compiled."""
    # mobiquant.kernels imports cuda-python lazily, so importing it proves nothing: ask whether NVRTC is there.
    from mobiquant.kernels import compile_kernels as nvrtc_compile
    from mobiquant.kernels import cuda_python_available

    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    if not cuda_python_available():
        # A build without cuda-python (the ``cuda`` extra) still yields a usable checkpoint (the PyTorch
        # path), and the report says that nothing was compiled.
        summary: dict[str, Any] = {
            "results": [],
            "note": "cuda-python's NVRTC is not installed (pip install '.[cuda]'): none built",
        }
    else:
        summary = {"results": [_jsonable(r) for r in nvrtc_compile(archs=tuple(archs))], "note": ""}
    (out_dir / "kernels.json").write_text(json.dumps(summary, indent=2))
    return {**summary, "seconds": time.perf_counter() - start}


def _jsonable(result: Any) -> Any:
    """A kernel compile result without its binary payload (CUBIN bytes stay out of reports)."""
    fields = result if isinstance(result, dict) else getattr(result, "__dict__", {"result": repr(result)})
    return {
        k: (f"<{len(v)} bytes>" if isinstance(v, bytes | bytearray) else v)
        for k, v in fields.items()
        if isinstance(v, str | int | float | bool | bytes | bytearray | type(None) | list)
    }


def validate(
    model_dir: Path,
    checkpoint_dir: Path,
    *,
    evaluation_data: str,
    eval_seqlen: int,
    eval_max_windows: int | None,
    budgets: list[float],
    num_slices: int,
    group_size: int,
    device: str,
    out_path: Path,
    model_key: str,
    checkpoint_files: dict[str, str],
    tasks: list[str] | None = None,
    task_bits: list[float] | None = None,
    task_include_path: str | None = None,
    task_limit: int | None = None,
) -> dict[str, Any]:
    """Perplexity at every budget, uniform 1..K slices, full precision and RTN, on the same tokens; lm-eval
    ``tasks`` on the routed model at every ``task_bits`` budget.

    Full precision and RTN stream the source one block at a time; the packed elastic model is the only
    whole model held. ``out_path`` keeps what was measured under which key (source ``model_key``, the
    checkpoint's file hashes, the evaluation tokens, every setting): a re-run with the same key, such as one
    after a failed gate with the gate changed, returns those measurements (``reused``) without measuring again.
    """
    from mobiquant.checkpoint import load_checkpoint
    from mobiquant.data import evaluation_tokens
    from mobiquant.devices import resolve_device
    from mobiquant.evaluation import perplexity, rtn_transform, streamed_perplexities
    from mobiquant.model_files import ModelFiles
    from mobiquant.precision import set_precision, track_bits
    from mobiquant.sources import load_tokenizer

    start = time.perf_counter()
    compute = resolve_device(device)
    tokenizer = load_tokenizer(model_dir)
    tokens = evaluation_tokens(tokenizer, evaluation_data)
    key = {
        "model": model_key,
        "checkpoint": manifest_digest(checkpoint_files),
        "tokens": hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest(),
        "device": compute.type,
        "settings": [eval_seqlen, eval_max_windows, sorted(budgets), num_slices, group_size],
        "tasks": [sorted(tasks or []), sorted(task_bits or []), task_include_path, task_limit],
    }
    if out_path.exists():
        kept = json.loads(out_path.read_text())
        if kept.get("key") == key:
            return {**kept, "reused": True, "seconds": time.perf_counter() - start}
    files = ModelFiles(model_dir)
    rtn_bits = sorted({int(b) for b in budgets if float(b).is_integer()} | {2 * k for k in range(1, num_slices + 1)})
    variants = {"fp": None, **{f"rtn{bits}": rtn_transform(files.arch, bits, group_size) for bits in rtn_bits}}
    streamed = streamed_perplexities(files, tokens, variants, compute, seqlen=eval_seqlen,
                                     max_windows=eval_max_windows, progress=False)
    result: dict[str, Any] = {
        "fp": {"ppl": streamed["fp"], "dtype": str(files.source_dtype).removeprefix("torch.")},
        "budgets": [],
        "uniform": [],
        "rtn": [{"bits": bits, "ppl": streamed[f"rtn{bits}"]} for bits in rtn_bits],
    }

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(model, tokens, seqlen=eval_seqlen, max_windows=eval_max_windows, progress=False)

    model = load_checkpoint(checkpoint_dir, device=compute)
    for slices in range(1, num_slices + 1):
        set_precision(model, slices=slices)
        with track_bits(model) as meter:
            value = ppl(model)
        result["uniform"].append({"slices": slices, "avg_bits": meter.avg_bits, "ppl": value})
    for bits in budgets:
        set_precision(model, avg_bits=bits)
        with track_bits(model) as meter:
            value = ppl(model)
        result["budgets"].append({"target_bits": bits, "avg_bits": meter.avg_bits, "ppl": value})
    if tasks:
        from mobiquant.harness import check_tasks, evaluate_tasks, task_manager

        manager = task_manager(task_include_path)
        check_tasks(manager, tasks)
        settings = [("routed", float(bits), {"avg_bits": float(bits)}) for bits in task_bits or []]
        result["tasks"] = evaluate_tasks(model, tokenizer, manager, tasks, settings, limit=task_limit)
    result["seconds"] = time.perf_counter() - start
    result["tokens"] = int(tokens.numel())
    result["key"] = key
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    partial.write_text(json.dumps(result, indent=2, allow_nan=True))
    partial.replace(out_path)
    return {**result, "reused": False}
