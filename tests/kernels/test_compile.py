"""CPU checks of the kernel library: NVRTC builds every module for every architecture, the disk cache,
compile errors, the PyTorch path and the on/off switch. No GPU or driver is needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mobiquant import kernels
from mobiquant.kernels import _compile
from mobiquant.kernels.__main__ import main as cli_main
from mobiquant.slicing import slice_weight, unpack_codes

ELF_MAGIC = b"\x7fELF"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kernel-cache")


@pytest.fixture(scope="module")
def first_build(cache_dir: Path) -> list[kernels.CompileResult]:
    return kernels.compile_kernels(kernels.DEFAULT_ARCHS, cache_dir=cache_dir)


def test_every_module_compiles_to_cubin_for_every_arch(first_build: list[kernels.CompileResult]) -> None:
    built = {(r.arch, r.kernel) for r in first_build}
    assert built == {(arch, name) for arch in kernels.DEFAULT_ARCHS for name in kernels.MODULES}
    for result in first_build:
        assert not result.cache_hit
        cubin = Path(result.path).read_bytes()
        assert cubin[:4] == ELF_MAGIC and len(cubin) == result.cubin_bytes > 0
        # Every kernel the launcher looks up is in the CUBIN's symbol table.
        for kernel_name in kernels.MODULES[result.kernel][1]:
            assert kernel_name.encode() + b"\0" in cubin


def test_second_build_hits_the_cache(first_build: list[kernels.CompileResult], cache_dir: Path) -> None:
    second = kernels.compile_kernels(kernels.DEFAULT_ARCHS, cache_dir=cache_dir)
    assert all(r.cache_hit for r in second)
    assert [(r.arch, r.kernel, r.cubin_bytes) for r in second] == [
        (r.arch, r.kernel, r.cubin_bytes) for r in first_build
    ]


def test_cache_key_changes_with_source_arch_and_options() -> None:
    base = ("src", {"common.cuh": "h"}, "sm_80", ("--std=c++17",), "13.0")
    keys = {
        _compile.cache_key(*base),
        _compile.cache_key("src2", *base[1:]),
        _compile.cache_key(base[0], {"common.cuh": "h2"}, *base[2:]),
        _compile.cache_key(*base[:2], "sm_90", *base[3:]),
        _compile.cache_key(*base[:3], ("--std=c++20",), base[4]),
        _compile.cache_key(*base[:4], "13.1"),
    }
    assert len(keys) == 6


def test_cache_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(_compile.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert kernels.default_cache_dir() == tmp_path / "elsewhere"
    source = 'extern "C" __global__ void tiny(int* p) { p[threadIdx.x] = 1; }'
    cubin, result = kernels.compile_source("tiny", source, "sm_80")
    assert Path(result.path).parent == tmp_path / "elsewhere" and cubin[:4] == ELF_MAGIC


def test_syntax_error_raises_with_the_nvrtc_log(tmp_path: Path) -> None:
    source = 'extern "C" __global__ void broken(int* p) { p[0] = ; }'
    with pytest.raises(kernels.KernelCompileError) as info:
        kernels.compile_source("broken", source, "sm_80", cache_dir=tmp_path)
    assert "error" in info.value.log and "broken.cu" in info.value.log
    assert info.value.log in str(info.value) and info.value.arch == "sm_80"
    assert not list(tmp_path.glob("*.cubin"))


def test_cli_prints_table_and_json(first_build: list[kernels.CompileResult], cache_dir: Path, capsys) -> None:
    assert cli_main(["compile", "--arch", "sm_80", "--cache-dir", str(cache_dir)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["arch", "kernel", "bytes", "seconds", "cache"]
    assert {line.split()[1] for line in table[1:]} == set(kernels.MODULES)
    assert cli_main(["compile", "--arch", "sm_90", "--cache-dir", str(cache_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["arch"], r["cache_hit"]) for r in rows} == {("sm_90", True)}


@pytest.mark.parametrize("value", ["off", "0", "false", "OFF"])
def test_environment_switch_disables_kernels(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MOBIQUANT_KERNELS", value)
    assert not kernels.enabled()


def test_kernels_enabled_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOBIQUANT_KERNELS", raising=False)
    assert kernels.enabled()
    monkeypatch.setenv("MOBIQUANT_KERNELS", "on")
    assert kernels.enabled()


def test_torch_path_matches_float64_reference() -> None:
    """The fallback used off-GPU (and for fp32) agrees with the packed format's definition."""
    out_features, in_features, group_size = 24, 128, 64
    sliced = slice_weight(torch.randn(out_features, in_features), group_size=group_size, num_slices=4)
    x = torch.randn(9, in_features)
    slices = torch.randint(1, 5, (9,))
    y = kernels.elastic_linear(x, sliced.planes, sliced.scale, sliced.zero, slices, group_size)
    s = sliced.scale.double().repeat_interleave(group_size, dim=1)
    z = sliced.zero.double().repeat_interleave(group_size, dim=1)
    for t in range(9):
        k = int(slices[t])
        weight = s * ((unpack_codes(sliced.planes, k).double() + 0.5) / 4 ** (k - 1) - z)
        expected = x[t].double() @ weight.T
        assert torch.allclose(y[t].double(), expected, rtol=1e-4, atol=1e-4)


def test_shape_errors_are_reported() -> None:
    sliced = slice_weight(torch.randn(8, 64), group_size=32, num_slices=2)
    with pytest.raises(ValueError, match="group_size"):
        kernels.elastic_linear(torch.randn(2, 64), sliced.planes, sliced.scale, sliced.zero, torch.ones(2), 48)
    with pytest.raises(ValueError, match="slices"):
        kernels.elastic_linear(torch.randn(2, 64), sliced.planes, sliced.scale, sliced.zero, torch.ones(3), 32)


def test_cli_reports_nvrtc_logs_on_stderr_and_errors_with_exit_1(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from mobiquant.kernels import __main__ as cli

    warned = kernels.CompileResult("sm_80", "decode", 1024, "decode.cu(7): warning: unused", 0.5, False, "x.cubin")
    monkeypatch.setattr(cli, "compile_kernels", lambda archs, cache_dir: [warned])
    assert cli_main(["compile", "--arch", "sm_80"]) == 0
    captured = capsys.readouterr()
    assert "warning: unused" in captured.err and "warning" not in captured.out

    def fail(archs: tuple[str, ...], cache_dir: str | None) -> list[kernels.CompileResult]:
        raise kernels.KernelCompileError("decode", "sm_80", "decode.cu(3): error: expected an expression")

    monkeypatch.setattr(cli, "compile_kernels", fail)
    assert cli_main(["compile", "--arch", "sm_80"]) == 1
    assert "expected an expression" in capsys.readouterr().err
