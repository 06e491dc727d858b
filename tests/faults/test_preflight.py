"""MLflow or the Prefect API unreachable: found before any download or calibration, with a clear message."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows import demo
from flows.compress import PreflightError, check_device, compress, preflight
from flows.params import parse_params
from tests.pipeline.conftest import tiny_params


def _dead_url() -> str:
    """A loopback URL nobody listens on (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_unreachable_mlflow_server_is_found_in_seconds(tiny_model: Path, tmp_path: Path) -> None:
    params = parse_params(tiny_params(tiny_model, tmp_path, mlflow_uri=_dead_url()))
    started = time.monotonic()
    with pytest.raises(PreflightError, match=r"MLflow at http://127\.0\.0\.1:\d+ is unreachable"):
        preflight(params)
    assert time.monotonic() - started < 10


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for a machine without CUDA")
def test_a_local_dask_cluster_without_cuda_refuses_a_cuda_compute_dtype_before_any_work(
    tiny_model: Path, tmp_path: Path
) -> None:
    params = parse_params(tiny_params(tiny_model, tmp_path, runner="dask", compute_dtype="bfloat16", device="auto"))
    with pytest.raises(PreflightError, match="compute_dtype bfloat16 needs a CUDA device"):
        check_device(params)
    # A remote cluster's workers resolve their own devices.
    check_device(params.model_copy(update={"dask_address": "tcp://scheduler:8786"}))



@pytest.mark.parametrize("native", [False, True], ids=["avx2-cpu", "bf16-cpu"])
def test_a_bf16_end_to_end_stage_on_a_cpu_without_bf16_instructions_is_refused_before_any_work(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    params = parse_params(tiny_params(tiny_model, tmp_path, device="cpu", end_to_end_steps=4,
                                      end_to_end_dtype="bfloat16"))
    if native:
        check_device(params)
        return
    with pytest.raises(PreflightError, match=r"^end_to_end_dtype bfloat16 needs a GPU or a CPU with bf16 "
                       r"instructions .* use float32$"):
        check_device(params)
    # Without the stage, or in float32, nothing runs bf16 products.
    check_device(params.model_copy(update={"end_to_end_steps": 0}))
    check_device(params.model_copy(update={"end_to_end_dtype": "float32"}))

def test_missing_mlflow_database_folder(tiny_model: Path, tmp_path: Path) -> None:
    params = parse_params(tiny_params(tiny_model, tmp_path, mlflow_uri=f"sqlite:///{tmp_path}/absent/mlflow.db"))
    with pytest.raises(PreflightError, match=r"MLflow database folder .*absent does not exist"):
        preflight(params)


def test_a_database_store_without_its_driver_is_one_line_and_keeps_its_password_out(
    tiny_model: Path, tmp_path: Path
) -> None:
    # The test environment has no PostgreSQL driver: the store fails when it first connects.
    uri = "postgresql://mlflow:S3cret@127.0.0.1:5432/mlflow"
    params = parse_params(tiny_params(tiny_model, tmp_path, mlflow_uri=uri))
    with pytest.raises(PreflightError, match=r"^MLflow at postgresql://mlflow:\*\*\*@127\.0\.0\.1:5432/mlflow needs a "
                       r"database driver: No module named '\w+'$"):
        preflight(params)


def test_flow_stops_before_heavy_work_when_mlflow_is_down(tiny_model: Path, tmp_path: Path, prefect_env: Path) -> None:
    with pytest.raises(PreflightError, match="is unreachable"):
        compress(**tiny_params(tiny_model, tmp_path, mlflow_uri=_dead_url()))
    assert not (tmp_path / "work").exists(), "nothing downloaded, captured or calibrated"
    assert not (tmp_path / "published").exists()


def test_unreachable_prefect_api_is_one_line_before_anything_runs(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = _dead_url() + "/api"
    argv = [
        "--model", str(tiny_model), "--samples", "2", "--seqlen", "16",
        "--work-dir", str(tmp_path / "work"),
        "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--publish-root", str(tmp_path / "published"),
    ]  # fmt: skip
    started = time.monotonic()
    with temporary_settings({PREFECT_API_URL: dead}):
        code = demo.main(argv)
    assert code == 1 and time.monotonic() - started < 15
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mobiquant demo: error: the Prefect API at {dead} is unreachable")
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no database, work folder or release written"


def test_unreachable_mlflow_from_the_demo_command(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", str(tiny_model), "--mlflow-uri", _dead_url(), "--work-dir", str(tmp_path / "work")]
    with temporary_settings({PREFECT_API_URL: ""}):
        assert demo.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MLflow at http://127.0.0.1:" in err[0] and "is unreachable" in err[0]
    assert not (tmp_path / "work").exists()


def test_a_failed_gate_from_the_demo_command_ends_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.compress
    from tasks.gate import GateFailedError

    def gate_fails(**_params: object) -> None:
        raise GateFailedError("quality gate failed: bits@2.5 = 0.2057 (limit 0.2) (report: r.md)")

    monkeypatch.setattr(flows.compress, "preflight", lambda params: params)
    monkeypatch.setattr(flows.compress, "compress", gate_fails)
    assert demo.main(["--work-dir", str(tmp_path / "work"), "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "mobiquant demo: error: quality gate failed: bits@2.5 = 0.2057 (limit 0.2) (report: r.md)"]
