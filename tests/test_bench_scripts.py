"""CPU checks of bench/ scripts that no other test runs: their one-line refusals, fault table and imports."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import device_parity, faults

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_speed_cpu_times_the_mobiquant_of_its_own_checkout(tmp_path: Path) -> None:
    """Run in isolated mode from elsewhere, the script must import this checkout's mobiquant, not an installed one."""
    probe = (
        "import runpy, sys; runpy.run_path(sys.argv[1], run_name='probe'); import mobiquant; print(mobiquant.__file__)"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", probe, str(REPO_ROOT / "bench" / "speed_cpu.py")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()).resolve() == REPO_ROOT / "mobiquant" / "__init__.py"


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ("cpu@float32", "two DEVICE@COMPUTE_DTYPE runs"),
        ("cpu@float32,cpu@float32,cpu@float32", "two DEVICE@COMPUTE_DTYPE runs"),
        ("cpu@float64,cpu@float32", "compute_dtype must be one of"),
        ("cpu@bfloat16,cpu@float32", "compute_dtype bfloat16 needs a CUDA device"),
    ],
)
def test_device_parity_refuses_malformed_runs_before_any_work(
    runs: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as stopped:
        device_parity.parse_runs(argparse.ArgumentParser(), runs)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for a machine without CUDA")
def test_device_parity_without_a_gpu_is_one_line() -> None:
    with pytest.raises(SystemExit) as stopped:
        device_parity.parse_runs(argparse.ArgumentParser(), "cuda@float32,cpu@float32")
    assert str(stopped.value.code).startswith("device_parity: device 'cuda': ")
    assert str(stopped.value.code).endswith("; nothing measured")


def test_device_parity_runs_the_same_spec_twice_as_two_runs() -> None:
    specs = device_parity.parse_runs(argparse.ArgumentParser(), "cpu@float32,cpu")
    assert [(spec, device.type, calibration.compute_dtype) for spec, device, calibration in specs] == [
        ("cpu@float32", "cpu", "float32"), ("cpu", "cpu", "float32")
    ]


def test_every_fault_test_has_a_row_label() -> None:
    names = {
        node.name
        for path in (REPO_ROOT / "tests" / "faults").glob("test_*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    }
    assert names - set(faults.CASES) == set(), "label these in bench/faults.py's CASES"
    assert set(faults.CASES) - names == set(), "CASES names tests that no longer exist"


def _report(nodeid: str, when: str, outcome: str, longrepr: object = None) -> SimpleNamespace:
    return SimpleNamespace(nodeid=nodeid, when=when, duration=0.1, longrepr=longrepr, passed=outcome == "passed",
                           failed=outcome == "failed", skipped=outcome == "skipped")


def test_a_skipped_fault_case_is_shown_with_its_reason_and_is_no_failure(capsys: pytest.CaptureFixture) -> None:
    collector = faults.Collector()
    skipped = "tests/faults/test_preflight.py::test_a_local_dask_cluster_without_cuda_refuses_a_cuda_compute_dtype_" \
              "before_any_work"
    passed = "tests/faults/test_packing.py::test_sign_bit_words_round_trip"
    for report in (
        _report(skipped, "setup", "skipped", ("x.py", 1, "Skipped: the check is for a machine without CUDA")),
        _report(skipped, "teardown", "passed"),
        _report(passed, "setup", "passed"), _report(passed, "call", "passed"), _report(passed, "teardown", "passed"),
    ):
        collector.pytest_runtest_logreport(report)
    rows = collector.rows
    assert rows[skipped].skipped and not rows[skipped].passed
    assert rows[skipped].observed == "skipped: the check is for a machine without CUDA"
    assert rows[passed].passed and rows[passed].observed == "as expected"
    faults.print_table(list(rows.values()))
    table = capsys.readouterr().out
    assert "| n/a " in table and "CHECK" not in table


def test_router_refit_bench_puts_back_the_routers_the_blocks_calibrated(tmp_path: Path) -> None:
    from test_method import FAST, tiny_llama

    from bench.router_refit import with_block_routers
    from mobiquant.calibration import CalibrationConfig, quantize_model
    from mobiquant.calibration.store import load_block_result, result_path

    torch.manual_seed(31)
    samples = torch.randint(0, 96, (4, 32))
    config = CalibrationConfig(**FAST, end_to_end_steps=2, end_to_end_lr=1e-2)
    refit = quantize_model(tiny_llama(8), samples, config, tmp_path / "w", progress=False)
    stale = with_block_routers(refit, tmp_path / "w" / "blocks", samples)
    for index, (block, refit_block) in enumerate(zip(stale.model.layers, refit.model.layers, strict=True)):
        saved = load_block_result(result_path(tmp_path / "w" / "blocks", index))
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            router, refit_router = block.get_submodule(name).router, refit_block.get_submodule(name).router
            assert torch.equal(router.fc1.weight, saved[f"{name}.router.fc1.weight"])
            assert not torch.equal(router.fc1.weight, refit_router.fc1.weight)
            # Only the routers differ, and each model has thresholds of its own routers.
            layer, refit_layer = block.get_submodule(name), refit_block.get_submodule(name)
            assert torch.equal(layer.scale, refit_layer.scale) and torch.equal(layer.planes, refit_layer.planes)
            assert not torch.equal(layer.thresholds, refit_layer.thresholds)
