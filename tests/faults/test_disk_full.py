"""Out of disk while a checkpoint is written: a clear error and no partial output folder."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

import mobiquant.checkpoint
from flows.compress import compress
from mobiquant import cli
from registry.hashing import tree_manifest
from tests.faults.runs import ROOT
from tests.pipeline.conftest import tiny_params

QUICK = ("--samples", "2", "--seqlen", "16", "--epochs", "1,1", "--router-hidden", "4", "--slices", "2")


def _disk_fills_up(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every tensor file write stop half-way with ENOSPC, as a full disk does; returns the files tried."""
    real_save = mobiquant.checkpoint.save_file
    tried: list[str] = []

    def save_until_full(tensors: dict[str, Any], filename: str, metadata: dict[str, str] | None = None) -> None:
        tried.append(filename)
        real_save(tensors, filename, metadata=metadata)
        size = os.path.getsize(filename)
        with open(filename, "r+b") as handle:
            handle.truncate(size // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(mobiquant.checkpoint, "save_file", save_until_full)
    return tried


def _leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def _quantize(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["quantize", *args])
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_full_disk_is_one_line_and_leaves_no_output(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tried = _disk_fills_up(monkeypatch)
    out = tmp_path / "ckpt"
    code, last = _quantize(
        capsys, str(tiny_model), "-o", str(out), "--data", str(tiny_model.parent / "train.txt"), *QUICK
    )
    assert tried, "the checkpoint write was reached"
    assert code == 1 and last.startswith("mobiquant quantize: error: [Errno 28] No space left on device")
    assert _leftovers(tmp_path, "ckpt") == [".ckpt.mobiquant-work"], "only the resumable work folder stays"


def test_full_disk_keeps_the_previous_checkpoint(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ckpt"
    data = str(tiny_model.parent / "train.txt")
    assert _quantize(capsys, str(tiny_model), "-o", str(out), "--data", data, *QUICK)[0] == 0
    before = tree_manifest(out)
    _disk_fills_up(monkeypatch)
    code, last = _quantize(capsys, str(tiny_model), "-o", str(out), "--data", data, "--force", *QUICK)
    assert code == 1 and "No space left on device" in last
    assert tree_manifest(out) == before
    assert _leftovers(tmp_path, "ckpt") == [".ckpt.mobiquant-work", "ckpt"]


def _limit_file_size(limit: int) -> None:
    # Writing past RLIMIT_FSIZE raises SIGXFSZ, which kills by default; ignored, the write fails with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_size_limited_file_in_a_real_process(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = str(tiny_model.parent / "train.txt")
    work = tmp_path / "work"
    first = tmp_path / "first"
    # A first run calibrates and keeps its work folder, so the limited run below only writes the checkpoint.
    code, _ = _quantize(capsys, str(tiny_model), "-o", str(first), "--data", data, "--work-dir", str(work),
                        "--keep-work", *QUICK)  # fmt: skip
    assert code == 0
    limit = (first / "model.safetensors").stat().st_size // 2
    out = tmp_path / "ckpt"
    command = [sys.executable, "-m", "mobiquant.cli", "quantize", str(tiny_model), "-o", str(out), "--data", data,
               "--work-dir", str(work), *QUICK]  # fmt: skip
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, preexec_fn=lambda: _limit_file_size(limit)
    )
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mobiquant quantize: error: could not write model.safetensors") and "File too large" in last
    assert _leftovers(tmp_path, "ckpt") == []


def test_flow_full_disk_leaves_no_checkpoint_and_publishes_nothing(
    tiny_model: Path, tmp_path: Path, prefect_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _disk_fills_up(monkeypatch)
    params = tiny_params(tiny_model, tmp_path, budgets=[4.0], eval_max_windows=1)
    with pytest.raises(OSError, match="No space left on device"):
        compress(**params)
    written = [p.name for p in (tmp_path / "work" / "runs").rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert written == [], "no assembled or checkpoint folder, not even half of one"
    assert not (tmp_path / "published").exists()
    client = MlflowClient(params["mlflow_uri"])
    assert client.search_registered_models() == []
