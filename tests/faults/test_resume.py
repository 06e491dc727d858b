"""A run killed with SIGKILL during calibration, started again: only unfinished blocks, identical checkpoint."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from prefect.settings import PREFECT_API_URL

from tests.faults.runs import finish, start_compress, tensor_hashes
from tests.pipeline.conftest import tiny_params
from tests.pipeline.tiny import build_tiny_llama

BLOCKS = 4


def test_killed_run_recomputes_only_unfinished_blocks_and_matches_an_uninterrupted_run(
    tmp_path: Path, prefect_server: None
) -> None:
    api = PREFECT_API_URL.value()
    for run in ("resumed", "reference"):
        (tmp_path / run).mkdir()
    model = build_tiny_llama(tmp_path / "model" / "tiny4", layers=BLOCKS)
    # Enough epochs that a block takes a moment: the kill lands between the first block and the last.
    settings = {"workers": 1, "epochs_stage1": 6, "epochs_stage2": 6, "samples": 8, "budgets": [4.0]}
    params = tiny_params(model, tmp_path / "resumed", eval_max_windows=1, **settings)
    first = start_compress(params, tmp_path / "prefect-resumed", api)
    blocks_root = tmp_path / "resumed" / "work" / "blocks"
    deadline = time.monotonic() + 240
    done: list[Path] = []
    while not done and first.poll() is None and time.monotonic() < deadline:
        done = sorted(blocks_root.rglob("block_0000.safetensors"))
        time.sleep(0.02)
    assert first.poll() is None, first.communicate()[0].decode(errors="replace")[-3000:]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert done, "the first run never finished a block"
    blocks_dir = done[0].parent
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in blocks_dir.glob("block_*.safetensors")}
    # `done` above already guarantees a finished block; the kill must also leave some block unfinished.
    assert len(before) < BLOCKS, "the kill came after every block had finished: nothing was left to resume"

    second = start_compress(params, tmp_path / "prefect-resumed", api)
    reference_params = tiny_params(model, tmp_path / "reference", eval_max_windows=1, **settings)
    reference = start_compress(reference_params, tmp_path / "prefect-reference", api)
    resumed_summary, reference_summary = finish(second), finish(reference)

    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in blocks_dir.glob("block_*.safetensors")}
    assert len(after) == BLOCKS
    assert all(after[name] == stat for name, stat in before.items()), "a finished block was recomputed"
    report = json.loads(next((tmp_path / "resumed" / "work" / "runs").rglob("blocks.json")).read_text())
    assert sorted(b["block"] for b in report if b.get("cached")) == sorted(int(n[6:10]) for n in before)

    resumed = tensor_hashes(Path(resumed_summary["checkpoint"]))
    assert resumed and resumed == tensor_hashes(Path(reference_summary["checkpoint"]))
