"""Capture every block's full-precision inputs, one block in memory at a time.

The stem computes block 0's inputs; then each block is loaded, run over the calibration samples and
dropped, its outputs being the next block's inputs. Each block's inputs are written as they are known,
in the source dtype unless asked otherwise, so an interrupted capture resumes from the last written block.
Then the blocks are walked backwards from the calibration loss for every token's saliency at every linear
(:mod:`mobiquant.calibration.saliency`), which weighs the tokens in the Hessians.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mobiquant.calibration.saliency import capture_token_saliency
from mobiquant.calibration.store import (
    KWARGS_FILE,
    MANIFEST,
    atomic_save,
    fp_input_path,
    holds_capture,
    load_block_kwargs,
    load_hidden,
    save_block_kwargs,
    stored_manifest,
)
from mobiquant.model_files import BlockSource
from mobiquant.streaming import first_block_inputs, run_block

# Part of the capture's key (and of the block results' resume key): captures of an older format (before the
# token saliencies; before every block's own arguments, v1) are taken again, and their results recomputed.
CAPTURE_FORMAT = "inputs+loss-saliency+block-kwargs-v2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@torch.no_grad()
def block_outputs(
    block: torch.nn.Module, inputs: torch.Tensor, block_kwargs: dict[str, Any], batch: int, dtype: torch.dtype
) -> torch.Tensor:
    """``block`` run over ``inputs`` in float32, ``batch`` samples at a time; outputs kept in ``dtype``."""
    device = next(block.parameters()).device
    outputs = torch.empty(inputs.shape, dtype=dtype, device=inputs.device)
    for start in range(0, len(inputs), batch):
        chunk = inputs[start : start + batch].to(device=device, dtype=torch.float32)
        outputs[start : start + batch] = run_block(block, chunk, block_kwargs).to(dtype)
    return outputs


def capture_key(samples: torch.Tensor, model_key: str, dtype: torch.dtype) -> dict[str, str]:
    return {"samples_sha256": hashlib.sha256(samples.cpu().numpy().tobytes()).hexdigest(), "model": model_key,
            "dtype": dtype_name(dtype), "format": CAPTURE_FORMAT}


def check_windows(source: BlockSource, samples: torch.Tensor) -> None:
    """Fail if the calibration windows are longer than the model's positions."""
    positions = getattr(source.config, "max_position_embeddings", None)
    if isinstance(positions, int) and samples.shape[-1] > positions:
        raise ValueError(f"calibration windows of {samples.shape[-1]} tokens are longer than the model's "
                         f"{positions} positions (max_position_embeddings): use a shorter seqlen")


def capture_block_inputs(
    source: BlockSource,
    samples: torch.Tensor,
    capture_dir: Path,
    *,
    device: torch.device,
    model_key: str,
    store_dtype: torch.dtype | None = None,
    provenance: dict[str, Any] | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> dict[str, Any]:
    """Write every block's full-precision inputs, the block arguments and the token saliencies under ``capture_dir``.

    Returns the manifest (also written as ``manifest.json``). A finished capture of the same samples, model
    and dtype is reused; an unfinished one resumes after its last written block.
    """
    check_windows(source, samples)
    capture_dir = Path(capture_dir)
    dtype = store_dtype or source.source_dtype
    key = capture_key(samples, model_key, dtype)
    manifest_path = capture_dir / MANIFEST
    tag = json.dumps(key, sort_keys=True)
    manifest = stored_manifest(capture_dir)
    # Every file read, not only found: one left empty or cut short by a power loss is captured again.
    if manifest is not None and all(manifest.get(k) == v for k, v in key.items()) and all(
        holds_capture(capture_dir / name, tag) for name in manifest["files"]
    ):
        return manifest
    manifest_path.unlink(missing_ok=True)
    capture_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    while written < source.num_blocks and holds_capture(fp_input_path(capture_dir, written), tag):
        written += 1
    kwargs_path = capture_dir / KWARGS_FILE
    if written == 0 or not holds_capture(kwargs_path, tag):
        stem = source.stem(device)
        hidden, block_kwargs = first_block_inputs(stem, source.arch, samples, dtype=dtype)
        save_block_kwargs(block_kwargs, kwargs_path, {"capture": tag})
        start = 0
    else:
        start = written - 1
        hidden = load_hidden(fp_input_path(capture_dir, start))
    block_kwargs = load_block_kwargs(kwargs_path, device)
    # A capture by an older version is taken again, and the blocks calibrated from it: the bar says why.
    older = manifest is not None and manifest.get("format") != CAPTURE_FORMAT
    bar = tqdm(total=source.num_blocks, initial=start, unit="block", disable=not progress,
               desc="capturing block inputs" + (" again (the work folder's capture is of an older format)" if older
                                                else ""))
    for index in range(start, source.num_blocks):
        path = fp_input_path(capture_dir, index)
        if not holds_capture(path, tag):
            atomic_save({"hidden": hidden}, path, {"block": str(index), "capture": tag})
        if index + 1 < source.num_blocks:
            block = source.block(index, device)
            hidden = block_outputs(block, hidden, block_kwargs.for_block(index), batch_size, dtype)
            del block
        bar.update(1)
    bar.close()
    started = time.perf_counter()
    saliencies = capture_token_saliency(source, samples, capture_dir, block_kwargs, tag, device=device,
                                        batch_size=batch_size, progress=progress)
    files = [fp_input_path(capture_dir, i).name for i in range(source.num_blocks)] + [KWARGS_FILE, *saliencies]
    manifest = {**key, "num_blocks": source.num_blocks, "shape": list(hidden.shape), "files": files,
                "saliency_seconds": time.perf_counter() - started, "provenance": provenance or {}}
    partial = manifest_path.with_name(MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=2))
    partial.replace(manifest_path)
    return manifest
