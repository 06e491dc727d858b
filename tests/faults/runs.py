"""Compress runs in their own processes (to kill them, or to run two at once) against one Prefect API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from registry.hashing import sha256_file

ROOT = Path(__file__).resolve().parents[2]
SUMMARY = "SUMMARY "
_CODE = (
    "import json, sys\n"
    "from flows.compress import compress\n"
    "print('SUMMARY ' + json.dumps(compress(**json.loads(sys.argv[1]))), flush=True)\n"
)


def start_compress(params: dict[str, Any], prefect_home: Path, api_url: str) -> subprocess.Popen[bytes]:
    """``compress(**params)`` in a new process group, with its own Prefect home (results, cache)."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.Popen(
        [sys.executable, "-c", _CODE, json.dumps(params)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def finish(process: subprocess.Popen[bytes], timeout: float = 300) -> dict[str, Any]:
    """Wait for a run; its summary, or an assertion error showing the end of its output."""
    out, _ = process.communicate(timeout=timeout)
    text = out.decode(errors="replace")
    assert process.returncode == 0, text[-3000:]
    line = next(line for line in text.splitlines() if line.startswith(SUMMARY))
    return json.loads(line[len(SUMMARY) :])


def tensor_hashes(checkpoint: Path) -> dict[str, str]:
    """sha256 of every tensor file of a checkpoint folder."""
    return {p.name: sha256_file(p) for p in sorted(checkpoint.glob("*.safetensors"))}
