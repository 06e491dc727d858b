"""CPU checks of the kernel host code around its optional parts: no cuda-python (the ``cuda`` extra), the
compile stage without NVRTC, concurrent builds of one module, and architectures the kernels cannot target.
No GPU or driver is needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mobiquant import kernels
from mobiquant.kernels import _compile
from mobiquant.kernels.__main__ import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
CUDA_MODULES = ("cuda", "cuda.bindings", "cuda.bindings.driver", "cuda.bindings.nvrtc", "cuda.pathfinder")
TINY_SOURCE = 'extern "C" __global__ void mbq_tiny(float* x) { x[0] = 1.0f; }'

# Run in a fresh interpreter where cuda-python cannot be imported: prints what enabled() decides.
WITHOUT_CUDA_PYTHON = """
import json, sys, warnings
sys.modules["cuda"] = None
from mobiquant import kernels
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        decisions = [kernels.enabled(), kernels.enabled()]
    except ImportError as exc:
        decisions = [f"{type(exc).__name__}: {exc}"]
print(json.dumps({"decisions": decisions, "warnings": [str(w.message) for w in caught]}))
"""


def _without_cuda_python(setting: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MOBIQUANT_KERNELS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    if setting is not None:
        env["MOBIQUANT_KERNELS"] = setting
    run = subprocess.run(
        [sys.executable, "-c", WITHOUT_CUDA_PYTHON], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture
def no_cuda_python(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """cuda-python made unimportable in this process (restored afterwards)."""
    for name in CUDA_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    # The answer is cached per process: forget the one given with cuda-python importable, and the one given here.
    kernels.cuda_python_available.cache_clear()
    yield
    kernels.cuda_python_available.cache_clear()


def test_default_setting_falls_back_to_pytorch_without_cuda_python_and_warns_once() -> None:
    seen = _without_cuda_python(None)
    assert seen["decisions"] == [False, False]
    assert len(seen["warnings"]) == 1 and "pip install '.[cuda]'" in seen["warnings"][0]


def test_explicit_kernels_request_without_cuda_python_is_a_one_line_error() -> None:
    (error,) = _without_cuda_python("on")["decisions"]
    assert error.startswith("CudaPythonMissingError") and "pip install '.[cuda]'" in error and "\n" not in error
    assert _without_cuda_python("off")["decisions"] == [False, False]


def test_cuda_python_available_follows_the_import(no_cuda_python: None) -> None:
    assert not kernels.cuda_python_available()


def test_compile_stage_records_none_built_without_nvrtc(no_cuda_python: None, tmp_path: Path) -> None:
    from tasks import stages

    summary = stages.compile_kernels(["sm_80"], tmp_path)
    assert summary["results"] == [] and "none built" in summary["note"]
    assert json.loads((tmp_path / "kernels.json").read_text())["note"] == summary["note"]


def test_cli_reports_missing_cuda_python_in_one_line(no_cuda_python: None, tmp_path: Path, capsys) -> None:
    assert cli_main(["compile", "--arch", "sm_80", "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "pip install '.[cuda]'" in err and "\n" not in err


def test_two_threads_finishing_the_same_module_both_succeed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Both threads compile together, and neither renames its files until both have written them.
    compiled = threading.Barrier(2, timeout=10)
    written = threading.Barrier(2, timeout=10)
    replace = Path.replace

    def fake_compile(*args: object) -> tuple[bytes, str]:
        compiled.wait()
        return b"\x7fELF-cubin", "log"

    def replace_together(self: Path, target: Path) -> Path:
        written.wait()
        return replace(self, target)

    monkeypatch.setattr(_compile, "nvrtc_version", lambda: "13.0")
    monkeypatch.setattr(_compile, "_nvrtc_compile", fake_compile)
    monkeypatch.setattr(Path, "replace", replace_together)
    errors: list[BaseException] = []

    def build() -> None:
        try:
            _compile.compile_source("race", "src", "sm_80", cache_dir=tmp_path)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".cubin", ".log"]


@pytest.mark.parametrize("arch", ["compute_90", "sm_75", "sm_8", "90", "sm_90x"])
def test_unsupported_architectures_are_refused_in_one_line(arch: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(kernels.UnsupportedArchError, match="sm_80"):
        kernels.compile_source("tiny", TINY_SOURCE, arch, cache_dir=tmp_path)
    assert cli_main(["compile", "--arch", "sm_80", "--arch", arch, "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert arch in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a", "sm_100", "sm_120a"])
def test_supported_architectures_pass_the_check(arch: str) -> None:
    _compile.check_arch(arch)


def test_an_empty_cubin_is_an_error_and_never_cached(tmp_path: Path) -> None:
    # NVRTC accepts a virtual architecture but writes no CUBIN for it.
    with pytest.raises(kernels.KernelCompileError, match="no CUBIN"):
        _compile._nvrtc_compile("tiny", TINY_SOURCE, "compute_90", {}, ())
    # An empty file in the cache (as older versions left) is rebuilt, not reported as a hit.
    key = _compile.cache_key(TINY_SOURCE, {}, "sm_80", _compile.BASE_OPTIONS, _compile.nvrtc_version())
    stale = tmp_path / f"tiny-sm_80-{key[:24]}.cubin"
    stale.write_bytes(b"")
    cubin, result = kernels.compile_source("tiny", TINY_SOURCE, "sm_80", cache_dir=tmp_path)
    assert not result.cache_hit and cubin[:4] == b"\x7fELF" and stale.read_bytes() == cubin
