"""The prefill path that dequantises each precision group's W_k and multiplies it with cuBLAS, on the CPU:
the kernel by its emulator (tests/kernels/dequant_emulator.py), row gains folded in, the host grouping by
``mobiquant.kernels.dequant_matmul`` with torch.matmul standing in for cuBLAS, against float64."""

from __future__ import annotations

import pytest
import torch

from mobiquant import kernels
from mobiquant.slicing import slice_weight
from tests.kernels.decode_emulator import EmulatorError
from tests.kernels.dequant_emulator import PLANTED_BUGS, emulate_dequant
from tests.kernels.test_emulator import float64_reference, token_errors

# The product with fp16 operands and fp32 accumulation, then rounded to fp16: a few 1e-4.
TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def random_gains(rows: int, out_features: int, generator: torch.Generator) -> torch.Tensor:
    """Row gains as calibration fits them (float16, about 1), one row per slice count."""
    return (0.7 + 0.6 * torch.rand(rows, out_features, generator=generator)).half()


@pytest.mark.parametrize(
    ("out_features", "in_features", "group_size", "tokens", "dtype", "stored", "gained"),
    [
        (19, 96, 32, 37, torch.float16, 4, False),
        (24, 320, 64, 40, torch.bfloat16, 4, False),
        (17, 256, 128, 33, torch.float16, 2, False),
        (19, 96, 32, 37, torch.float16, 4, True),
        (24, 320, 64, 40, torch.bfloat16, 3, True),
    ],
)
def test_dequant_then_matmul_matches_float64(
    out_features: int, in_features: int, group_size: int, tokens: int, dtype: torch.dtype, stored: int, gained: bool
) -> None:
    generator = torch.Generator().manual_seed(out_features * 1000 + in_features + stored)
    sliced = slice_weight(torch.randn(out_features, in_features, generator=generator) * 0.05, group_size, 4)
    sliced = sliced.truncate(stored)
    # Gains for all 4 slice counts on a truncated checkpoint, as a layer loaded with max_slices passes them.
    gains = random_gains(4, out_features, generator) if gained else None
    sliced.gains = None if gains is None else gains[:stored]
    x = torch.randn(tokens, in_features, generator=generator).to(dtype)
    slices = torch.randint(1, stored + 1, (tokens,), generator=generator)
    dequantised: list[int] = []

    def dequantise(k: int) -> torch.Tensor:
        dequantised.append(k)
        return emulate_dequant(sliced.planes, sliced.scale, sliced.zero, k, group_size, dtype, gains)

    out = torch.full((tokens, out_features), float("nan"), dtype=dtype)
    kernels.dequant_matmul(x, slices, stored, dequantise, out)
    assert sorted(dequantised) == sorted(set(slices.tolist()))  # one W_k per precision group present
    errors = token_errors(out.double(), float64_reference(x, sliced, slices))
    assert errors.max() <= TOLERANCE[dtype], errors


def test_uniform_batch_is_one_product_into_out() -> None:
    sliced = slice_weight(torch.randn(16, 64) * 0.05, 32, 4)
    x = torch.randn(20, 64)
    out = torch.empty(20, 16)
    calls: list[int] = []

    def dequantise(k: int) -> torch.Tensor:
        calls.append(k)
        return kernels.reference_elastic_linear(torch.eye(64), sliced.planes, sliced.scale, sliced.zero,
                                                torch.full((64,), k), 32).T  # fmt: skip

    result = kernels.dequant_matmul(x, torch.full((20,), 9), 3, dequantise, out)  # 9 is clamped to 3
    assert calls == [3] and result.data_ptr() == out.data_ptr()
    expected = float64_reference(x, sliced, torch.full((20,), 3))
    assert token_errors(out.double(), expected).max() < 1e-5


@pytest.mark.parametrize(("uniform", "used"), [(2, 2), (7, 3), (0, 1)])
def test_a_uniform_count_known_on_the_host_reads_no_count_back(uniform: int, used: int) -> None:
    """With ``uniform`` the counts are never read: here they live on the meta device, which has no data."""
    generator = torch.Generator().manual_seed(uniform)
    sliced = slice_weight(torch.randn(16, 64, generator=generator) * 0.05, 32, 4).truncate(3)
    x = torch.randn(20, 64, generator=generator)
    calls: list[int] = []

    def dequantise(k: int) -> torch.Tensor:
        calls.append(k)
        return emulate_dequant(sliced.planes, sliced.scale, sliced.zero, k, 32, torch.float16, None).float()

    out = torch.empty(20, 16)
    counts = torch.empty(20, dtype=torch.long, device="meta")
    result = kernels.dequant_matmul(x, counts, 3, dequantise, out, uniform=uniform)
    assert calls == [used] and result.data_ptr() == out.data_ptr()
    assert token_errors(out.double(), float64_reference(x, sliced, torch.full((20,), used))).max() < 1e-3
    with pytest.raises((RuntimeError, NotImplementedError)):  # without it the counts are read
        kernels.dequant_matmul(x, counts, 3, dequantise, out)


@pytest.mark.parametrize("bug", sorted(PLANTED_BUGS))
def test_planted_dequant_bugs_are_caught(bug: str) -> None:
    sliced = slice_weight(torch.randn(19, 96) * 0.05, 32, 4)
    sliced.gains = random_gains(4, 19, torch.Generator().manual_seed(3))
    try:
        weight = emulate_dequant(sliced.planes, sliced.scale, sliced.zero, 3, 32, torch.float16, sliced.gains,
                                 frozenset({bug}))  # fmt: skip
    except EmulatorError:
        return
    x = torch.randn(5, 96).half()
    got = x.double() @ weight.double().T
    errors = token_errors(got, float64_reference(x, sliced, torch.full((5,), 3)))
    assert errors.max() > TOLERANCE[torch.float16], f"{bug} went unnoticed"


def test_prefill_path_by_size_and_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.PREFILL_ENV, raising=False)
    assert kernels.prefill_path(kernels.PREFILL_DEQUANT_MIN_TOKENS) == "dequant"
    assert kernels.prefill_path(kernels.PREFILL_DEQUANT_MIN_TOKENS - 1) == "grouped"
    monkeypatch.setenv(kernels.PREFILL_ENV, "grouped")
    assert kernels.prefill_path(4096) == "grouped"
    monkeypatch.setenv(kernels.PREFILL_ENV, "dequant")
    assert kernels.prefill_path(17) == "dequant"
    monkeypatch.setenv(kernels.PREFILL_ENV, "fastest")
    with pytest.raises(ValueError, match="MOBIQUANT_PREFILL"):
        kernels.prefill_path(17)
