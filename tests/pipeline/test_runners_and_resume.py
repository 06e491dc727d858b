"""Layer-parallel calibration on a Dask LocalCluster, and resume after a SIGKILL during calibration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flows.compress import compress
from tests.pipeline.conftest import tiny_params
from tests.pipeline.tiny import build_tiny_llama

ROOT = Path(__file__).resolve().parents[2]


def test_dask_local_cluster_of_two_workers(tiny_model: Path, tmp_path: Path, prefect_env: Path) -> None:
    summary = compress(**tiny_params(tiny_model, tmp_path, runner="dask", workers=2))
    assert Path(summary["checkpoint"], "config.json").is_file()


def _run_in_subprocess(params: dict, env_dir: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PREFECT_HOME": str(env_dir / "prefect-home"),
        "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
        "PREFECT_API_URL": "",
        "PYTHONPATH": str(ROOT),
    }
    code = "import json, sys; from flows.compress import compress; compress(**json.loads(sys.argv[1]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(params)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_killed_run_recomputes_only_unfinished_blocks(tmp_path: Path) -> None:
    model = build_tiny_llama(tmp_path / "model" / "tiny4", layers=4)
    params = tiny_params(model, tmp_path, workers=1, epochs_stage1=6, epochs_stage2=6, samples=8)
    first = _run_in_subprocess(params, tmp_path)
    blocks_root = tmp_path / "work" / "blocks"
    deadline = time.monotonic() + 240
    done: list[Path] = []
    while not done and first.poll() is None and time.monotonic() < deadline:
        done = sorted(blocks_root.rglob("block_0000.safetensors"))
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert done, "the first run never finished a block"
    blocks_dir = done[0].parent
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in blocks_dir.glob("block_*.safetensors")}
    assert 1 <= len(before) < 4

    second = _run_in_subprocess(params, tmp_path)
    out, _ = second.communicate(timeout=400)
    assert second.returncode == 0, out.decode()[-3000:]
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in blocks_dir.glob("block_*.safetensors")}
    assert len(after) == 4
    assert all(after[name] == stat for name, stat in before.items()), "a finished block was recomputed"
    report = json.loads(next((tmp_path / "work" / "runs").rglob("blocks.json")).read_text())
    assert sorted(b["block"] for b in report if b.get("cached")) == sorted(int(n[6:10]) for n in before)
