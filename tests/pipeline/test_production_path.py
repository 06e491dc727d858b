"""The production path on loopback: server, process work pool, deploy --all, worker, deployment run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from mlflow.tracking import MlflowClient

from tests.pipeline.conftest import tiny_params

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_server_pool_deploy_worker_run(tiny_model: Path, tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
    }
    started: list[subprocess.Popen] = []

    def background(*args: str, log: str) -> None:
        handle = open(tmp_path / log, "wb")  # noqa: SIM115 (closed with the process at the end)
        started.append(
            subprocess.Popen(args, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        )

    def run(*args: str, timeout: int = 120) -> str:
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        return done.stdout

    try:
        background(PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), log="server.log")
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        run(PREFECT, "work-pool", "create", "mobiquant", "--type", "process")
        run(PREFECT, "--no-prompt", "deploy", "--all", timeout=180)
        background(PREFECT, "worker", "start", "--pool", "mobiquant", log="worker.log")
        params = tiny_params(tiny_model, tmp_path)
        overrides = {k: params[k] for k in params if k != "kernel_archs"}
        out = run(
            PREFECT,
            "deployment",
            "run",
            "compress/demo",
            "--params",
            json.dumps(overrides),
            "--watch",
            "--watch-timeout",
            "300",
            timeout=360,
        )
        assert "Completed" in out, out[-2000:] + (tmp_path / "worker.log").read_text()[-3000:]
        assert next((tmp_path / "work" / "runs").rglob("checkpoint/config.json"))
        client = MlflowClient(params["mlflow_uri"])
        version = client.get_model_version_by_alias("mobiquant-tiny-llama", "candidate")
        assert version.tags["gate"] == "passed"
    finally:
        for process in reversed(started):
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
