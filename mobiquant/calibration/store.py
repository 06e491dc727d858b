"""The calibration's files: captured block inputs and arguments, block results, and the one resume key.

Every file is written beside its final name and renamed into place, so an interrupted run leaves whole
files or none. A block result records the resume key it was computed under; a later run reuses it only
when the key matches (same source model, same calibration samples and input dtype, same settings).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mobiquant.calibration.config import RESULT_FORMAT, CalibrationConfig
from mobiquant.sources import file_sha256
from mobiquant.streaming import BlockKwargs

MANIFEST = "manifest.json"
KWARGS_FILE = "kwargs.safetensors"


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``save_file`` with its write failures (disk full, size limit) raised as one clear ``OSError``."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as error:
        path.unlink(missing_ok=True)
        raise OSError(f"could not write {path}: {error}") from error


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, partial, metadata)
    partial.replace(path)


def file_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata() or {}


def readable_metadata(path: Path) -> dict[str, str] | None:
    """The metadata of the safetensors file ``path``, or ``None`` if it is missing or unreadable: files are renamed
    into place without fsync, so a power loss can leave one empty or cut short, and it is then computed again."""
    if not Path(path).exists():
        return None
    try:
        return file_metadata(Path(path))
    except SafetensorError:
        return None


# --------------------------------------------------------------------------------------------------------------------
# Captured inputs


def fp_input_path(capture_dir: Path, index: int) -> Path:
    return Path(capture_dir) / f"block_{index:04d}.safetensors"


def quantized_input_path(capture_dir: Path, index: int, key: str) -> Path:
    return Path(capture_dir) / f"block_{index:04d}.quantized-{key}.safetensors"


def holds_capture(path: Path, tag: str) -> bool:
    """Whether ``path`` is a readable file written by the capture ``tag`` names."""
    meta = readable_metadata(path)
    return meta is not None and meta.get("capture") == tag


def load_hidden(path: Path, device: torch.device | str = "cpu") -> torch.Tensor:
    return load_file(str(path), device=str(device))["hidden"]


def stored_manifest(capture_dir: Path) -> dict[str, Any] | None:
    """The capture's manifest, or ``None`` if there is none or it is unreadable (empty or cut short by a power
    loss, as a file renamed into place without fsync can be): the capture is then taken again."""
    path = Path(capture_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_manifest(capture_dir: Path) -> dict[str, Any]:
    manifest = stored_manifest(capture_dir)
    if manifest is None:
        raise FileNotFoundError(f"no readable capture in {capture_dir}: run the capture stage first")
    return manifest


def save_block_kwargs(block_kwargs: BlockKwargs, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Tensors (and tuples of tensors) to safetensors; each set's structure, its plain values and which set each
    block takes to its metadata. Tensors are copied: sets share some (position ids, rotary embeddings), and
    safetensors refuses tensors sharing memory."""
    tensors: dict[str, torch.Tensor] = {}
    layouts: list[dict[str, Any]] = []
    for number, kwargs in enumerate(block_kwargs.sets):
        layout: dict[str, Any] = {}
        for name, value in kwargs.items():
            key = f"{number}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.clone()
                layout[name] = {"tensor": key}
            elif isinstance(value, tuple | list) and all(isinstance(v, torch.Tensor) for v in value):
                keys = [f"{key}.{i}" for i in range(len(value))]
                tensors.update({k: v.clone() for k, v in zip(keys, value, strict=True)})
                layout[name] = {"tuple": keys}
            elif value is None or isinstance(value, bool | int | float | str):
                layout[name] = {"value": value}
            else:
                raise TypeError(f"cannot store block argument {name!r} of type {type(value).__name__}")
        layouts.append(layout)
    atomic_save(tensors, Path(path), {**(metadata or {}), "layout": json.dumps(layouts),
                                      "set_of_block": json.dumps(block_kwargs.set_of_block)})


def load_block_kwargs(path: Path, device: torch.device | str = "cpu") -> BlockKwargs:
    """Every block's arguments, floating-point tensors in float32 (the blocks compute in float32)."""
    tensors = load_file(str(path), device=str(device))
    metadata = file_metadata(Path(path))
    sets = []
    for layout in json.loads(metadata["layout"]):
        kwargs: dict[str, Any] = {}
        for name, spec in layout.items():
            if "tensor" in spec:
                kwargs[name] = tensors[spec["tensor"]]
            elif "tuple" in spec:
                kwargs[name] = tuple(tensors[k] for k in spec["tuple"])
            else:
                kwargs[name] = spec["value"]
        sets.append(kwargs)
    return BlockKwargs(tuple(sets), tuple(json.loads(metadata["set_of_block"]))).float()


# --------------------------------------------------------------------------------------------------------------------
# Block results


def resume_key(manifest: dict[str, Any], config: CalibrationConfig) -> str:
    """The one key of a block result: source model, calibration samples, stored input dtype, capture format
    (a result computed from an older capture is computed again), settings."""
    keyed = {"model": manifest["model"], "samples": manifest["samples_sha256"], "dtype": manifest["dtype"],
             "capture": manifest["format"], "config": config.digest()}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def result_path(blocks_dir: Path, index: int) -> Path:
    return Path(blocks_dir) / f"block_{index:04d}.safetensors"


def result_is_complete(out_path: Path, key: str, block_index: int) -> bool:
    """Whether ``out_path`` holds block ``block_index`` computed under resume key ``key``."""
    meta = readable_metadata(Path(out_path))
    if meta is None:
        return False
    return meta.get("format") == RESULT_FORMAT and meta.get("resume_key") == key and meta.get("block") == str(
        block_index
    )


def read_result_report(out_path: Path) -> dict[str, Any]:
    """What a block result records beside its tensors; ``unreached`` (the linears no calibration token reached) is
    None for a result saved before it was recorded."""
    meta = file_metadata(Path(out_path))
    unreached = json.loads(meta["unreached"]) if "unreached" in meta else None
    return {"block": int(meta["block"]), "losses": json.loads(meta["losses"]), "seconds": float(meta["seconds"]),
            "device": meta.get("device", ""), "unreached": unreached, "path": str(out_path),
            "sha256": file_sha256(Path(out_path))}


def save_block_result(state: dict[str, torch.Tensor], losses: dict[str, list[float]], seconds: float,
                      out_path: Path, config: CalibrationConfig, key: str, block_index: int, device: str,
                      unreached: Sequence[str] = ()) -> None:
    metadata = {"format": RESULT_FORMAT, "resume_key": key, "block": str(block_index), "device": device,
                "losses": json.dumps(losses), "seconds": f"{seconds:.3f}", "unreached": json.dumps(list(unreached)),
                "config": json.dumps(config.to_dict(), sort_keys=True)}
    atomic_save(state, Path(out_path), metadata)


def load_block_result(out_path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_path))
