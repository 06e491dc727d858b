"""Error-compensated codes against an independent float64 Optimal Brain Quantizer written here.

The reference keeps the explicit inverse Hessian and removes each quantized column from it by
Gaussian elimination (OBQ, Frantar & Alistarh 2022), one column at a time, with no Cholesky factor and
no lazy batches; GPTQ must reach the same codes and the same output error.
"""

from collections.abc import Callable

import pytest
import torch

from mobiquant.evaluation import rtn_quantize
from mobiquant.gptq import minmax_gptq_weight, nested_codes
from mobiquant.slicing import dequantize_codes, full_codes, slice_weight

GROUP = 32


def heavy_tailed(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02 + 0.001 * torch.randn(
        rows, cols, generator=generator)


def correlated_inputs(tokens: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Inputs with strongly correlated columns of unequal size (so compensation and activation order matter)."""
    mixing = torch.randn(cols, cols, generator=generator, dtype=torch.float64) / cols**0.5
    mixing += torch.eye(cols, dtype=torch.float64)
    return torch.randn(tokens, cols, generator=generator, dtype=torch.float64) @ mixing * (
        torch.rand(cols, generator=generator, dtype=torch.float64) * 3 + 0.1)


def damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    h = hessian.clone()
    h.diagonal()[h.diagonal() == 0] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())
    return h


def reference_obq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    choose: Callable[[int, list[torch.Tensor]], tuple[torch.Tensor, list[torch.Tensor]]],
    copies: int,
    act_order: bool,
    damp: float = 0.01,
) -> tuple[torch.Tensor, list[float]]:
    """Codes and each copy's output error: quantize a column, push its error into the open columns, eliminate it."""
    h = damped(hessian.double(), damp)
    cols = h.shape[0]
    # Activation order: largest undamped H_ii first, ties in column order.
    order = sorted(range(cols), key=lambda i: (-float(hessian[i, i]), i)) if act_order else list(range(cols))
    inverse = torch.linalg.inv(h)
    work = [weight.double().clone() for _ in range(copies)]
    codes = torch.zeros(weight.shape, dtype=torch.int64)
    losses = [0.0] * copies
    open_columns = list(order)
    for column in order:
        open_columns.remove(column)
        column_codes, quantized = choose(column, [w[:, column] for w in work])
        codes[:, column] = column_codes
        d = inverse[column, column]
        for index in range(copies):
            error = work[index][:, column] - quantized[index]
            losses[index] += float(error.pow(2).sum() / d)
            for other in open_columns:
                work[index][:, other] -= error * inverse[column, other] / d
        inverse = inverse - torch.outer(inverse[:, column], inverse[column, :]) / d
    return codes, losses


def grid_value(code: torch.Tensor, bits: int, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return s * ((code.double() + 0.5) / 2.0 ** (bits - 2) - z)


def weighted_chooser(scale: torch.Tensor, zero: torch.Tensor, weights: dict[int, float]) -> Callable:
    """Brute force over every code of the finest weighted precision, coarser codes by shifting."""
    precisions = sorted(weights)
    finest = precisions[-1]

    def choose(column: int, values: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        s, z = scale[:, column // GROUP].double(), zero[:, column // GROUP].double()
        candidates = torch.arange(2**finest).unsqueeze(0)
        cost = sum(weights[b] * (grid_value(candidates >> (finest - b), b, s[:, None], z[:, None])
                                 - v[:, None]).pow(2) for b, v in zip(precisions, values, strict=True))
        best = cost.argmin(dim=-1)
        return best, [grid_value(best >> (finest - b), b, s, z) for b in precisions]

    return choose


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    diff = quantized.double() - weight.double()
    return float(((diff @ hessian) * diff).sum())


@pytest.mark.parametrize(("bits", "act_order", "block_size", "clip"),
                         [(2, True, 16, 0.8), (2, False, 128, 1.0), (4, True, 32, 0.9), (3, True, 7, 0.85)])
def test_one_weighted_precision_is_plain_gptq(bits: int, act_order: bool, block_size: int, clip: float) -> None:
    generator = torch.Generator().manual_seed(bits * 10 + block_size)
    torch.manual_seed(bits + block_size)
    weight, x = heavy_tailed(24, 96, generator), correlated_inputs(300, 96, generator)
    x[:, 5] = 0.0  # a column no input reaches
    hessian = x.T @ x
    sliced = slice_weight(weight, GROUP, 4, clip=clip)
    codes, errors = nested_codes(weight, hessian, sliced.scale, sliced.zero, 8, {bits: 1.0},
                                 block_size=block_size, act_order=act_order)
    expected, losses = reference_obq(weight, hessian, weighted_chooser(sliced.scale, sliced.zero, {bits: 1.0}),
                                     1, act_order)
    assert torch.equal(codes >> (8 - bits), expected)
    assert errors[bits] == pytest.approx(losses[0], rel=1e-9)
    # The error the loop reports is the true output error of the codes under the damped Hessian.
    quantized = grid_value(expected, bits, sliced.scale.double().repeat_interleave(GROUP, 1),
                           sliced.zero.double().repeat_interleave(GROUP, 1))
    assert errors[bits] == pytest.approx(output_error(weight, quantized, damped(hessian, 0.01)), rel=1e-9)


def test_weighted_precisions_match_brute_force_reference() -> None:
    generator = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    weight, x = heavy_tailed(16, 64, generator), correlated_inputs(200, 64, generator)
    hessian = x.T @ x
    sliced = slice_weight(weight, GROUP, 4, clip=0.9)
    weights = {2: 4.0, 4: 1.0, 6: 2.0}
    codes, errors = nested_codes(weight, hessian, sliced.scale, sliced.zero, 8, weights, block_size=16)
    expected, losses = reference_obq(weight, hessian, weighted_chooser(sliced.scale, sliced.zero, weights), 3, True)
    assert torch.equal(codes >> 2, expected)
    for bits, loss in zip(sorted(weights), losses, strict=True):
        assert errors[bits] == pytest.approx(loss, rel=1e-9)
    # The bits under the finest weighted precision round its compensated value: never a different 6-bit code.
    assert int(codes.min()) >= 0 and int(codes.max()) <= 255


def test_diagonal_hessian_gives_nearest_rounding() -> None:
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    weight = heavy_tailed(20, 64, generator)
    hessian = torch.diag(torch.rand(64, generator=generator, dtype=torch.float64) + 0.5)
    sliced = slice_weight(weight, GROUP, 4, clip=0.8)
    floor = full_codes(weight, sliced.scale.float(), sliced.zero.float(), 4)
    for bits in (2, 4, 6):
        codes, _ = nested_codes(weight, hessian, sliced.scale, sliced.zero, 8, {bits: 1.0})
        assert torch.equal(codes >> (8 - bits), floor >> (8 - bits))
    codes, _ = nested_codes(weight, hessian, sliced.scale, sliced.zero, 8, {8: 1.0})
    assert torch.equal(codes, floor)


@pytest.mark.parametrize("seed", range(4))
def test_weighted_error_never_worse_than_floor_codes(seed: int) -> None:
    generator = torch.Generator().manual_seed(100 + seed)
    torch.manual_seed(100 + seed)
    weight, x = heavy_tailed(32, 128, generator), correlated_inputs(400, 128, generator)
    hessian = x.T @ x
    sliced = slice_weight(weight, GROUP, 4, clip=0.85)
    weights = {2: 1.0, 4: 24.0, 6: 32.0, 8: 2.0}
    codes, _ = nested_codes(weight, hessian, sliced.scale, sliced.zero, 8, weights)
    floor = full_codes(weight, sliced.scale.float(), sliced.zero.float(), 4)

    def weighted(c: torch.Tensor) -> float:
        return sum(w * output_error(weight, dequantize_codes(c >> (8 - b), sliced.scale, sliced.zero, b // 2,
                                                             torch.float64), hessian) for b, w in weights.items())

    assert weighted(codes) < weighted(floor)


def test_minmax_gptq_matches_reference_and_rtn_on_a_diagonal_hessian() -> None:
    generator = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    weight, x = heavy_tailed(12, 64, generator), correlated_inputs(200, 64, generator)
    hessian = x.T @ x
    grouped = weight.double().reshape(12, 2, GROUP)
    scale = (grouped.amax(-1) - grouped.amin(-1)) / 7
    zero = torch.round(-grouped.amin(-1) / scale)

    def choose(column: int, values: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        s, z = scale[:, column // GROUP], zero[:, column // GROUP]
        code = torch.clamp(torch.round(values[0] / s) + z, 0, 7)
        return code.long(), [(code - z) * s]

    codes, _ = reference_obq(weight, hessian, choose, 1, True)
    expected = (codes.double() - zero.repeat_interleave(GROUP, 1)) * scale.repeat_interleave(GROUP, 1)
    torch.testing.assert_close(minmax_gptq_weight(weight.double(), hessian, 3, GROUP, block_size=16), expected,
                               rtol=0, atol=1e-12)
    diagonal = torch.diag(hessian.diagonal())
    torch.testing.assert_close(minmax_gptq_weight(weight.double(), diagonal, 3, GROUP),
                               rtn_quantize(weight.double(), 3, GROUP), rtol=0, atol=1e-12)


def test_rejects_precisions_it_cannot_search() -> None:
    weight = torch.randn(4, 32)
    sliced = slice_weight(weight, GROUP, 4)
    with pytest.raises(ValueError, match="weighted precisions"):
        nested_codes(weight, torch.eye(32), sliced.scale, sliced.zero, 8, {10: 1.0})
    with pytest.raises(ValueError, match="not all zero"):
        nested_codes(weight, torch.eye(32), sliced.scale, sliced.zero, 8, {2: 0.0})
