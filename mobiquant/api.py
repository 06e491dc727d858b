"""``mobiquant.quantize(model, tokenizer, data=..., config=...)``: the Python entry point, in the style of torchao.

It runs the same driver as ``mobiquant quantize`` and the pipeline. The caller's model is left as it was (its
weights and dtype untouched); the elastic model is returned. No work folder is needed: without one, the
run works in a temporary folder that is removed afterwards (pass ``work_dir`` to make it resumable).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mobiquant.calibration import CalibrationConfig, quantize_files
from mobiquant.checkpoint import refuse_quantized
from mobiquant.data import Corpus, DataSourceError, calibration_samples, corpus_samples
from mobiquant.devices import resolve_device


def _samples(tokenizer: Any, data: Any, samples: int, seqlen: int, seed: int) -> tuple[torch.Tensor, str]:
    """Token windows from a data source name or path, a list of texts, or a dataset with a ``text`` column."""
    if isinstance(data, str | os.PathLike):
        return calibration_samples(tokenizer, os.fspath(data), samples, seqlen, seed), os.fspath(data)
    if hasattr(data, "column_names"):
        if "text" not in data.column_names:
            raise DataSourceError(f"the dataset has no 'text' column (columns: {data.column_names})")
        texts = list(data["text"])
        described = f"dataset of {len(texts)} rows"
    elif isinstance(data, Iterable):
        texts = list(data)
        described = f"{len(texts)} texts"
    else:
        raise DataSourceError(f"data must be a source name, a path, texts or a dataset, not {type(data).__name__}")
    if not texts or not all(isinstance(t, str) for t in texts):
        raise DataSourceError("data must hold at least one text, and only strings")
    corpus = Corpus([t for t in texts if t.strip()], description=described)
    return corpus_samples(tokenizer, corpus, samples, seqlen, seed), described


def quantize(
    model: nn.Module,
    tokenizer: Any,
    data: Any = "shakespeare:train",
    config: CalibrationConfig | Mapping[str, Any] | None = None,
    *,
    samples: int = 16,
    seqlen: int = 256,
    device: str | torch.device | None = "auto",
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> nn.Module:
    """An elastic MoBiQuant copy of ``model`` calibrated on ``data``; ``model`` itself is not changed.

    ``data``: a source name (``shakespeare``, ``wikitext2``, ``c4``), a text file or folder, a list of texts,
    or a ``datasets.Dataset`` with a ``text`` column. ``config``: a :class:`CalibrationConfig` or a dict of its
    fields. Non-quantized tensors keep the model's dtype. Blocks calibrate on ``device`` (``auto``: CUDA
    when present). Save the result with ``save_pretrained`` or ``mobiquant.save_checkpoint``.
    """
    refuse_quantized(model)
    if not isinstance(config, CalibrationConfig):
        config = CalibrationConfig.from_dict(dict(config or {}))
    compute = resolve_device(device)
    ids, described = _samples(tokenizer, data, samples, seqlen, config.seed)
    provenance = {"calibration_data": {"source": described, "samples": samples, "seqlen": seqlen}}
    with tempfile.TemporaryDirectory(prefix="mobiquant-") as scratch:
        # The model is read back one block at a time from safetensors files, as every other entry point does:
        # the caller's model is only read, and no float32 copy of it is made.
        source = Path(scratch) / "source"
        model.save_pretrained(source, safe_serialization=True)
        work = Path(work_dir) if work_dir is not None else Path(scratch) / "work"
        key = _content_key(source)
        return quantize_files(source, ids, config, work / key[:16], model_key=key, device=compute,
                              provenance=provenance, progress=progress)


def _content_key(folder: Path) -> str:
    from mobiquant.sources import folder_sha256

    return folder_sha256(folder)
