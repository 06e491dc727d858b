"""Error-compensated codes against an independent float64 Optimal Brain Quantizer written here.

The reference keeps the explicit inverse Hessian and removes each quantized column from it by
Gaussian elimination (OBQ, Frantar & Alistarh 2022), one column at a time, with no Cholesky factor and
no lazy batches; GPTQ must reach the same codes and the same output error.
"""

import copy
import dataclasses
import json
from collections.abc import Callable

import pytest
import torch

from mobiquant.calibration import CalibrationConfig, TrainableSlicedLinear, calibrate_block
from mobiquant.calibration.block import truncation_errors
from mobiquant.calibration.trainable import fix_codes
from mobiquant.evaluation import rtn_quantize
from mobiquant.gptq import minmax_gptq_weight, nested_codes, nested_codes_many, shared_passes
from mobiquant.slicing import SlicedWeight, dequantize_codes, fit_row_gains, full_codes, slice_weight, unpack_codes
from tests.test_method import heavy_tailed_block, linear_inputs, one_slice_block_error

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


def gained_value(code: torch.Tensor, bits: int, s: torch.Tensor, z: torch.Tensor,
                 gain: torch.Tensor | None) -> torch.Tensor:
    """The grid value pulled towards (gain < 1) or pushed from its group's centre ``s (2 - z)``."""
    plain = grid_value(code, bits, s, z)
    return plain if gain is None else s * (2 - z) + gain * (plain - s * (2 - z))


def weighted_chooser(scale: torch.Tensor, zero: torch.Tensor, weights: dict[int, float],
                     code_bits: int, gains: dict[int, torch.Tensor] | None = None) -> tuple[Callable, int]:
    """Brute force over every code of the finest weighted precision, coarser codes by shifting; finer bits
    (unweighted) round a copy of their own inside the chosen code's interval. Returns the chooser and its copies."""
    precisions = sorted(weights)
    finest = precisions[-1]
    gains = gains or {}

    def choose(column: int, values: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        s, z = scale[:, column // GROUP].double(), zero[:, column // GROUP].double()
        candidates = torch.arange(2**finest).unsqueeze(0)
        weighted_values = values[: len(precisions)]
        cost = sum(weights[b] * (gained_value(candidates >> (finest - b), b, s[:, None], z[:, None],
                                              gains[b][:, None] if b in gains else None)
                                 - v[:, None]).pow(2) for b, v in zip(precisions, weighted_values, strict=True))
        best = cost.argmin(dim=-1)
        quantized = [gained_value(best >> (finest - b), b, s, z, gains.get(b)) for b in precisions]
        if code_bits == finest:
            return best, quantized
        spread = 2 ** (code_bits - finest)
        nearest = torch.floor((values[-1] / s + z) * 2.0 ** (code_bits - 2)).long()
        full = torch.clamp(nearest, best * spread, best * spread + spread - 1)
        return full, [*quantized, grid_value(full, code_bits, s, z)]

    return choose, len(precisions) + (code_bits > finest)


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
    expected, losses = reference_obq(weight, hessian, *weighted_chooser(sliced.scale, sliced.zero, {bits: 1.0}, 8),
                                     act_order)
    assert torch.equal(codes, expected)
    assert errors[bits] == pytest.approx(losses[0], rel=1e-9)
    assert errors[8] == pytest.approx(losses[1], rel=1e-9)
    expected = expected >> (8 - bits)
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
    expected, losses = reference_obq(weight, hessian, *weighted_chooser(sliced.scale, sliced.zero, weights, 8), True)
    assert torch.equal(codes, expected)
    for bits, loss in zip([*sorted(weights), 8], losses, strict=True):
        assert errors[bits] == pytest.approx(loss, rel=1e-9)


@pytest.mark.parametrize(("weights", "gained"), [({2: 4.0, 4: 1.0, 6: 2.0}, (2, 4)), ({2: 1.0, 8: 1.0}, (2, 8)),
                                                  ({4: 1.0}, (4,))])
def test_row_gains_choose_codes_for_the_gained_weights(weights: dict[int, float], gained: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(sum(weights) + len(gained))
    torch.manual_seed(int(sum(gained)))
    weight, x = heavy_tailed(12, 64, generator), correlated_inputs(200, 64, generator)
    hessian = x.T @ x
    sliced = slice_weight(weight, GROUP, 4, clip=0.9)
    gains = {b: torch.rand(12, generator=generator, dtype=torch.float64) * 0.8 + 0.5 for b in gained}
    codes, errors = nested_codes(weight, hessian, sliced.scale, sliced.zero, 8, weights, block_size=16,
                                 row_gains=gains)
    expected, losses = reference_obq(weight, hessian, *weighted_chooser(sliced.scale, sliced.zero, weights, 8, gains),
                                     True)
    assert torch.equal(codes, expected)
    plain, _ = nested_codes(weight, hessian, sliced.scale, sliced.zero, 8, weights, block_size=16)
    assert not torch.equal(codes, plain)
    s = sliced.scale.double().repeat_interleave(GROUP, 1)
    z = sliced.zero.double().repeat_interleave(GROUP, 1)
    for bits in weights:
        # The reported error is the gained weight's true output error under the damped Hessian.
        gain = gains[bits][:, None] if bits in gains else None
        quantized = gained_value(expected >> (8 - bits), bits, s, z, gain)
        assert errors[bits] == pytest.approx(output_error(weight, quantized, damped(hessian, 0.01)), rel=1e-9)
    assert [errors[b] for b in sorted(weights)] == pytest.approx(losses[: len(weights)], rel=1e-9)


def test_row_gains_must_be_finite_on_weighted_precisions_and_positive_at_the_finest() -> None:
    weight = torch.randn(8, 32)
    sliced = slice_weight(weight, GROUP, 4)
    with pytest.raises(ValueError, match="weighted precisions only"):
        nested_codes(weight, torch.eye(32), sliced.scale, sliced.zero, 8, {4: 1.0}, row_gains={2: torch.ones(8)})
    for bad in (torch.full((8,), float("nan")), torch.ones(7)):
        with pytest.raises(ValueError, match="must be finite, one per output row"):
            nested_codes(weight, torch.eye(32), sliced.scale, sliced.zero, 8, {2: 1.0, 4: 1.0}, row_gains={2: bad})
    with pytest.raises(ValueError, match="finest weighted precision's row gains must be positive"):
        nested_codes(weight, torch.eye(32), sliced.scale, sliced.zero, 8, {2: 1.0, 4: 1.0},
                     row_gains={4: torch.zeros(8)})
    # A coarser precision's gain may be anything finite: its candidates are all tried.
    codes, _ = nested_codes(weight, torch.eye(32), sliced.scale, sliced.zero, 8, {2: 1.0, 4: 1.0},
                            row_gains={2: -torch.ones(8)})
    assert codes.shape == weight.shape


def weighted_objective(weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                       weights: dict[int, float], hessian: torch.Tensor) -> float:
    """``sum_b lambda_b ||X (W - Q_b)^T||^2`` of 8-bit codes, each precision read by shifting."""
    s, z = scale.double().repeat_interleave(GROUP, 1), zero.double().repeat_interleave(GROUP, 1)
    return sum(w * output_error(weight, grid_value(codes >> (8 - b), b, s, z), hessian) for b, w in weights.items())


@pytest.mark.parametrize(("weights", "code_bits"), [({2: 2.0, 4: 24.0, 6: 32.0, 8: 8.0}, 8), ({2: 4.0, 4: 1.0}, 8),
                                                     ({4: 1.0}, 4)])
def test_descent_sweeps_lower_the_weighted_error_and_report_it(weights: dict[int, float], code_bits: int) -> None:
    generator = torch.Generator().manual_seed(len(weights) * 11 + code_bits)
    torch.manual_seed(len(weights) + code_bits)
    weight, x = heavy_tailed(20, 96, generator), correlated_inputs(300, 96, generator)
    hessian = x.T @ x
    sliced = slice_weight(weight, GROUP, code_bits // 2, clip=0.85)
    reference = damped(hessian, 0.1)
    s, z = sliced.scale.double().repeat_interleave(GROUP, 1), sliced.zero.double().repeat_interleave(GROUP, 1)
    objectives = []
    for sweeps in range(4):
        codes, errors = nested_codes(weight, hessian, sliced.scale, sliced.zero, code_bits, weights, block_size=16,
                                     damp=0.1, descent_sweeps=sweeps)
        objectives.append(sum(w * output_error(weight, grid_value(codes >> (code_bits - b), b, s, z), reference)
                              for b, w in weights.items()))
        for bits in [*weights, code_bits]:
            quantized = grid_value(codes >> (code_bits - bits), bits, s, z)
            assert errors[bits] == pytest.approx(output_error(weight, quantized, reference), rel=1e-9)
    assert objectives[1] < objectives[0] * 0.999
    assert objectives[3] <= objectives[2] * (1 + 1e-12) and objectives[2] <= objectives[1] * (1 + 1e-12)


def test_descent_converges_to_codes_no_single_change_improves() -> None:
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    weights = {2: 2.0, 4: 24.0, 6: 32.0, 8: 8.0}
    weight, x = heavy_tailed(3, 64, generator), correlated_inputs(200, 64, generator)
    hessian = x.T @ x
    sliced = slice_weight(weight, GROUP, 4, clip=0.85)
    reference = damped(hessian, 0.1)
    gptq_codes, _ = nested_codes(weight, hessian, sliced.scale, sliced.zero, 8, weights, block_size=16, damp=0.1)
    codes, _ = nested_codes(weight, hessian, sliced.scale, sliced.zero, 8, weights, block_size=16, damp=0.1,
                            descent_sweeps=40)
    assert not torch.equal(codes, gptq_codes)
    best = weighted_objective(weight, codes, sliced.scale, sliced.zero, weights, reference)
    assert best < weighted_objective(weight, gptq_codes, sliced.scale, sliced.zero, weights, reference)
    # Every single code changed to every other value, the whole objective evaluated afresh.
    s, z = sliced.scale.double().repeat_interleave(GROUP, 1), sliced.zero.double().repeat_interleave(GROUP, 1)
    for row in range(codes.shape[0]):
        for column in range(codes.shape[1]):
            trials = codes.repeat(256, 1, 1)
            trials[:, row, column] = torch.arange(256)
            costs = sum(w * torch.einsum("trc,cd,trd->t", error, reference, error)
                        for b, w in weights.items()
                        for error in [grid_value(trials >> (8 - b), b, s, z) - weight.double()])
            assert float(costs.min()) >= best * (1 - 1e-9), (row, column)


@pytest.mark.parametrize("sweeps", [-1, 1.5, True])
def test_descent_sweeps_are_checked(sweeps: object) -> None:
    weight = torch.randn(4, 32)
    sliced = slice_weight(weight, GROUP, 4)
    with pytest.raises(ValueError, match="descent_sweeps must be a whole number >= 0"):
        nested_codes(weight, torch.eye(32), sliced.scale, sliced.zero, 8, {4: 1.0}, descent_sweeps=sweeps)


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


@pytest.mark.parametrize(("code_bits", "sweeps", "block_size"), [(8, 0, 16), (8, 1, 24), (6, 0, 7)])
def test_weights_sharing_a_pass_get_the_codes_of_a_pass_each(code_bits: int, sweeps: int, block_size: int) -> None:
    generator = torch.Generator().manual_seed(code_bits * 7 + sweeps)
    torch.manual_seed(code_bits + sweeps)
    rows = (24, 8, 40)
    weights = [heavy_tailed(out, 96, generator) for out in rows]
    hessians = []
    for _ in rows:  # each its own inputs: its own activation order, factor and dampening scale
        x = correlated_inputs(200, 96, generator)
        hessians.append(x.T @ x)
    hessians[1][7] = 0.0
    hessians[1][:, 7] = 0.0  # a column no input of the second weight reaches
    slicings = [slice_weight(w, GROUP, 4, clip=clip) for w, clip in zip(weights, (0.8, 0.9, 1.0), strict=True)]
    finest = min(code_bits, 6)
    # One finest weight; the coarser weights differ per weight, and one weight has row gains.
    objectives = [{2: 4.0, 4: 24.0, finest: 8.0}, {2: 32.0, 4: 24.0, finest: 8.0}, {2: 1.0, 4: 1.0, finest: 8.0}]
    gains = [None, {2: 0.8 + 0.4 * torch.rand(8, generator=generator, dtype=torch.float64)}, None]
    together = nested_codes_many(weights, hessians, [s.scale for s in slicings], [s.zero for s in slicings],
                                 code_bits, objectives, block_size=block_size, damp=0.05, row_gains=gains,
                                 descent_sweeps=sweeps)
    # The pass replayed from one block's buffers (a CUDA graph on a GPU) chooses the same codes.
    replayed = nested_codes_many(weights, hessians, [s.scale for s in slicings], [s.zero for s in slicings],
                                 code_bits, objectives, block_size=block_size, damp=0.05, row_gains=gains,
                                 descent_sweeps=sweeps, cuda_graphs=True)
    for (codes, errors), (replayed_codes, replayed_errors) in zip(together, replayed, strict=True):
        assert torch.equal(codes, replayed_codes)
        assert errors == pytest.approx(replayed_errors, rel=1e-12)
    for index, (codes, errors) in enumerate(together):
        alone, alone_errors = nested_codes(weights[index], hessians[index], slicings[index].scale,
                                           slicings[index].zero, code_bits, objectives[index],
                                           block_size=block_size, damp=0.05, row_gains=gains[index],
                                           descent_sweeps=sweeps)
        assert torch.equal(codes, alone), index
        assert errors == pytest.approx(alone_errors, rel=1e-9), index
    if sweeps == 0:  # and the independent OBQ reference for the first weight
        expected, losses = reference_obq(weights[0], hessians[0], *weighted_chooser(
            slicings[0].scale, slicings[0].zero, objectives[0], code_bits), True, damp=0.05)
        assert torch.equal(together[0][0], expected)
        assert list(together[0][1].values()) == pytest.approx(losses, rel=1e-9)


def test_a_pass_refuses_weights_that_cannot_share_it() -> None:
    generator = torch.Generator().manual_seed(3)
    weights = [heavy_tailed(8, 64, generator), heavy_tailed(8, 64, generator)]
    sliced = [slice_weight(w, GROUP, 4) for w in weights]
    scales, zeros = [s.scale for s in sliced], [s.zero for s in sliced]
    for objectives in ([{4: 1.0, 8: 1.0}, {4: 1.0, 6: 1.0, 8: 1.0}], [{4: 1.0, 8: 1.0}, {4: 1.0, 8: 2.0}]):
        with pytest.raises(ValueError, match="one input width, weighted precisions and finest weight"):
            nested_codes_many(weights, [torch.eye(64)] * 2, scales, zeros, 8, objectives)
    with pytest.raises(ValueError, match="one Hessian, scale, zero, objective and gains entry per weight"):
        nested_codes_many(weights, [torch.eye(64)], scales, zeros, 8, [{8: 1.0}] * 2)


def test_shared_passes_group_one_input_and_objective_within_the_memory_budget() -> None:
    default, value = {1: 2.0, 2: 24.0, 3: 32.0, 4: 8.0}, {1: 32.0, 2: 24.0, 3: 32.0, 4: 8.0}
    # A Llama-3-8B block: q, k, v, o, gate, up read 4096 columns, down 14336.
    shapes = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
    objectives = [default, default, value, default, default, default, default]
    assert shared_passes(shapes, objectives) == [[0, 1, 2, 3, 4], [5], [6]]
    assert shared_passes(shapes, objectives, budget=1.0) == [[0, 1, 2, 3], [4], [5], [6]]
    # Another finest weight or another set of weighted precisions is another pass.
    objectives[2] = {1: 1.0, 2: 1.0, 3: 1.0, 4: 2.0}
    objectives[3] = {2: 1.0, 4: 8.0}
    assert shared_passes(shapes, objectives) == [[0, 1, 4], [2], [3], [5], [6]]


def test_calibrated_block_stores_compensated_codes_on_its_inputs_hessian() -> None:
    torch.manual_seed(21)
    arch, block, inputs, block_kwargs, _targets = heavy_tailed_block(lambda shape: heavy_tailed(
        *shape, torch.Generator().manual_seed(shape[0] + shape[1])))
    # A dampening neither GPTQ's 0.01 nor the config's default: the codes must be chosen with the one asked.
    config = CalibrationConfig(group_size=GROUP, epochs_stage1=1, epochs_stage2=1, batch_size=4,
                               precision_weights=(4.0, 24.0, 32.0, 0.0), damp=0.37)
    seen = linear_inputs(arch, block, inputs, block_kwargs)
    linears = arch.quantized_linears(block)
    result = calibrate_block(block, inputs, block_kwargs, arch, config, progress=False)
    for name, linear in linears.items():
        x = seen[name].double()
        scale, zero = result.state[f"{name}.scale"], result.state[f"{name}.zero"]
        # The value projection has weights of its own by default (checked in the per-linear tests below).
        objective = {2: 32.0, 4: 24.0, 6: 32.0, 8: 8.0} if name == "self_attn.v_proj" else {2: 4.0, 4: 24.0, 6: 32.0}
        expected, _ = nested_codes(linear.weight.detach(), x.T @ x, scale.float(), zero.float(), 8, objective,
                                   damp=0.37)
        stored = unpack_codes(result.state[f"{name}.planes"], 4)
        assert torch.equal(stored, expected), name
        undamped, _ = nested_codes(linear.weight.detach(), x.T @ x, scale.float(), zero.float(), 8, objective)
        assert not torch.equal(stored, undamped), name  # the dampening decides codes here: the check has teeth
        plain = SlicedWeight(result.state[f"{name}.planes"], scale, zero, GROUP)
        gains = result.state[f"{name}.gains"]
        # The default fits 1 and 2 slices; finer precisions keep gain 1.
        assert torch.equal(gains, fit_row_gains(linear.weight.detach(), x.T @ x, plain, 2)), name
        assert not torch.equal(gains[:2], torch.ones_like(gains[:2])), name
        assert torch.equal(gains[2:], torch.ones_like(gains[2:])), name
    assert "stage2" in result.losses and len(result.losses["stage2"]) == 1
    without = calibrate_block(block, inputs, block_kwargs, arch, dataclasses.replace(config, row_gain_slices=0),
                              progress=False)
    for name in linears:
        assert torch.equal(without.state[f"{name}.planes"], result.state[f"{name}.planes"]), name
        assert torch.equal(without.state[f"{name}.gains"], torch.ones_like(result.state[f"{name}.gains"])), name


def test_calibrated_block_sweeps_its_codes_when_asked() -> None:
    torch.manual_seed(22)
    arch, block, inputs, block_kwargs, _targets = heavy_tailed_block(lambda shape: heavy_tailed(
        *shape, torch.Generator().manual_seed(shape[0] * 3 + shape[1])))
    config = CalibrationConfig(group_size=GROUP, epochs_stage1=0, epochs_stage2=0, router_hidden=0, batch_size=4,
                               precision_weights=(4.0, 24.0, 32.0, 8.0), row_gain_slices=0, descent_sweeps=2)
    seen = linear_inputs(arch, block, inputs, block_kwargs)
    result = calibrate_block(block, inputs, block_kwargs, arch, config, progress=False)
    swept = 0
    for name, linear in arch.quantized_linears(block).items():
        x = seen[name].double()
        scale, zero = result.state[f"{name}.scale"].float(), result.state[f"{name}.zero"].float()
        objective = config.compensation_objective(name)
        bits = {2 * k: w for k, w in objective.items()}
        expected, _ = nested_codes(linear.weight.detach(), x.T @ x, scale, zero, 8, bits, damp=config.damp,
                                   descent_sweeps=2)
        assert torch.equal(unpack_codes(result.state[f"{name}.planes"], 4), expected), name
        gptq, _ = nested_codes(linear.weight.detach(), x.T @ x, scale, zero, 8, bits, damp=config.damp)
        swept += not torch.equal(expected, gptq)
    assert swept > 0


def heavy_tailed_linear(seed: int, bias: bool) -> tuple[torch.nn.Linear, torch.Generator]:
    """A 64 -> 24 linear with heavy-tailed weights, and the generator that drew them (seeded with ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    linear = torch.nn.Linear(64, 24, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(heavy_tailed(24, 64, generator))
    return linear, generator


def test_gain_aware_passes_choose_the_codes_for_the_gains_and_refit_them() -> None:
    linear, generator = heavy_tailed_linear(8, bias=False)
    x = correlated_inputs(300, 64, generator)
    hessian = x.T @ x
    weights = {1: 4.0, 2: 24.0, 3: 32.0, 4: 2.0}
    bits = {2 * k: w for k, w in weights.items()}
    module = TrainableSlicedLinear(linear, CalibrationConfig(group_size=GROUP, router_hidden=0))
    fix_codes([module], [hessian], [weights], damp=0.1, row_gain_slices=2)
    first = copy.deepcopy(module.fixed)
    (errors,) = fix_codes([module], [hessian], [weights], damp=0.1, row_gain_slices=2, gain_aware_passes=1)
    scale, zero = first.scale.float(), first.zero.float()
    # The same steps by hand: codes for the first codes' gains at 1 and 2 slices, then the gains of those codes.
    row_gains = {2: first.gains[0].double(), 4: first.gains[1].double()}
    expected, expected_errors = nested_codes(linear.weight.detach(), hessian, scale, zero, 8, bits, damp=0.1,
                                             row_gains=row_gains)
    assert torch.equal(unpack_codes(module.fixed.planes, 4), expected)
    assert not torch.equal(module.fixed.planes, first.planes)
    plain = SlicedWeight(module.fixed.planes, first.scale, first.zero, GROUP)
    assert torch.equal(module.fixed.gains, fit_row_gains(linear.weight.detach(), hessian, plain, 2))
    assert errors == {k // 2: e for k, e in expected_errors.items()}


def test_fixed_codes_drive_the_layer_the_router_fit_and_the_checkpoint() -> None:
    linear, generator = heavy_tailed_linear(5, bias=True)
    x = correlated_inputs(300, 64, generator).float()
    module = TrainableSlicedLinear(linear, CalibrationConfig(group_size=GROUP))
    fix_codes([module], [x.double().T @ x.double()], [{1: 4.0, 2: 24.0, 3: 32.0, 4: 2.0}], damp=0.1,
              row_gain_slices=4)
    layer = module.to_mobilinear()
    floor = slice_weight(linear.weight.detach(), GROUP, 4, clip=(module.clip_factors()[0].detach(),
                                                                   module.clip_factors()[1].detach()))
    assert torch.equal(layer.scale, floor.scale) and torch.equal(layer.zero, floor.zero)
    assert not torch.equal(layer.planes, floor.planes)
    errors = truncation_errors(module, x)
    for e in range(1, 4):
        diff = layer.sliced_weight().dequantize(e, torch.float64) - linear.weight.detach().double()
        torch.testing.assert_close(errors[:, e - 1].double(), (x.double() @ diff.T).pow(2).sum(-1), rtol=1e-4, atol=0)
    for k in range(1, 5):
        module.uniform_slices = k
        torch.testing.assert_close(module(x), layer(x, k), rtol=1e-5, atol=1e-6)
    assert not module.upper_logit.requires_grad and not module.lower_logit.requires_grad
    # The row gains lower every precision's output error on the inputs they were fitted to.
    plain = SlicedWeight(layer.planes, layer.scale, layer.zero, GROUP)
    for k in range(1, 5):
        gained, ungained = (x.double() @ (w.dequantize(k, torch.float64) - linear.weight.detach().double()).T
                            for w in (layer.sliced_weight(), plain))
        assert gained.pow(2).sum() <= ungained.pow(2).sum() * (1 + 1e-4), k
    assert errors[:, 0].sum() < 0.99 * (x.double() @ (plain.dequantize(1, torch.float64)
                                                      - linear.weight.detach().double()).T).pow(2).sum()


def test_compensation_lowers_a_two_bit_controls_block_error() -> None:
    setup = heavy_tailed_block(lambda shape: torch.distributions.StudentT(3.0).sample(shape) * 0.05)
    errors = {
        compensate: one_slice_block_error(setup, CalibrationConfig(group_size=GROUP, epochs_stage1=0, epochs_stage2=0,
                                                                   target_bits=2.0, error_compensation=compensate))
        for compensate in (False, True)
    }
    assert errors[True] < 0.9 * errors[False], errors


def test_precision_weights_are_checked() -> None:
    assert CalibrationConfig(num_slices=3, precision_weights=(1, 2, 0)).compensation_objective() == {1: 1.0, 2: 2.0}
    assert CalibrationConfig(target_bits=4.0, precision_weights=(1, 2, 3, 4)).compensation_objective() == {2: 1.0}
    with pytest.raises(ValueError, match="precision_weights needs 4"):
        CalibrationConfig(precision_weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="at most 4 slices"):
        CalibrationConfig(num_slices=5, precision_weights=(1, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="error_compensation=False"):
        CalibrationConfig(num_slices=5, target_bits=10.0)
    assert CalibrationConfig(num_slices=5, target_bits=10.0, error_compensation=False).target_bits == 10.0
    for damp in (0.0, -0.1, 10.5, float("nan")):
        with pytest.raises(ValueError, match="damp must be in"):
            CalibrationConfig(damp=damp)
    assert CalibrationConfig(damp=0.5).digest() != CalibrationConfig().digest()  # another resume key


def test_per_linear_weights_change_that_linear_only_and_in_the_direction_asked() -> None:
    torch.manual_seed(23)
    arch, block, inputs, block_kwargs, _targets = heavy_tailed_block(lambda shape: heavy_tailed(
        *shape, torch.Generator().manual_seed(shape[0] * 7 + shape[1])))
    seen = linear_inputs(arch, block, inputs, block_kwargs)
    common = {"group_size": GROUP, "epochs_stage1": 0, "epochs_stage2": 0, "router_hidden": 0}
    favour_one_slice = (1.0, 0.0, 0.0, 0.0)
    default = calibrate_block(block, inputs, block_kwargs, arch, CalibrationConfig(**common), progress=False)
    # By its last part for the clip search, by its full name for the codes.
    override = calibrate_block(block, inputs, block_kwargs, arch, CalibrationConfig(
        **common, module_clip_search_weights={"q_proj": favour_one_slice},
        module_precision_weights={"self_attn.q_proj": favour_one_slice}), progress=False)
    for name in arch.linears:
        same = [torch.equal(default.state[f"{name}.{key}"], override.state[f"{name}.{key}"])
                for key in ("planes", "scale", "zero")]
        assert not any(same) if name == "self_attn.q_proj" else all(same), name
    name = "self_attn.q_proj"
    x = seen[name].double()
    weight = arch.quantized_linears(block)[name].weight.detach().double()

    def output_error(state: dict[str, torch.Tensor], k: int) -> float:
        codes = unpack_codes(state[f"{name}.planes"], 4) >> (2 * (4 - k))
        approx = dequantize_codes(codes, state[f"{name}.scale"], state[f"{name}.zero"], k, torch.float64)
        return float((x @ (approx - weight).T).pow(2).sum())

    assert output_error(override.state, 1) < 0.8 * output_error(default.state, 1)
    assert output_error(override.state, 2) > output_error(default.state, 2)


def test_per_linear_weight_names_are_checked() -> None:
    from mobiquant.arch import architecture_for

    config = CalibrationConfig(module_precision_weights={"v_proj": (1, 0, 0, 0), "mlp.down_proj": (0, 1, 0, 0)},
                               module_clip_search_weights={"proj": (1, 0, 0, 0)})
    assert config.compensation_objective("self_attn.v_proj") == {1: 1.0}
    assert config.compensation_objective("mlp.down_proj") == {2: 1.0}
    assert config.compensation_objective("self_attn.q_proj") == {1: 2.0, 2: 24.0, 3: 32.0, 4: 8.0}
    # The defaults: the value projection weighs one slice most in its codes; its clip search is the shared one.
    assert CalibrationConfig().compensation_objective("self_attn.v_proj") == {1: 32.0, 2: 24.0, 3: 32.0, 4: 8.0}
    assert CalibrationConfig(num_slices=2).clip_objective("self_attn.v_proj") == {1: 1.0, 2: 24.0}
    assert CalibrationConfig().clip_objective("mlp.up_proj") == {1: 1.0, 2: 24.0, 3: 32.0, 4: 32.0}
    assert CalibrationConfig(target_bits=4.0).clip_objective("self_attn.v_proj") == {2: 1.0}
    with pytest.raises(ValueError, match=r"'proj', which is not a quantized linear of llama blocks \(self_attn.q_proj"):
        config.check_linear_names(architecture_for("llama"))
    with pytest.raises(ValueError, match=r"module_precision_weights\['v_proj'\] needs 4"):
        CalibrationConfig(module_precision_weights={"v_proj": (1, 2)})
    # Through JSON (the resume key and the checkpoint's config) and back.
    assert CalibrationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_a_blocks_result_does_not_depend_on_what_other_threads_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks calibrated in threads of one process share torch's global generator: another thread drawing from
    it while a block's routers are made must not change the block's result."""
    arch, block, inputs, block_kwargs, _targets = heavy_tailed_block(lambda shape: heavy_tailed(
        *shape, torch.Generator().manual_seed(shape[0] * 7 + shape[1])))
    config = CalibrationConfig(group_size=GROUP, epochs_stage1=1, epochs_stage2=1, batch_size=4, router_hidden=8)
    alone = calibrate_block(copy.deepcopy(block), inputs, block_kwargs, arch, config, progress=False)

    def drawn_between(linear: torch.nn.Linear, *args: object) -> TrainableSlicedLinear:
        torch.rand(3)  # what a block in another thread draws meanwhile
        return TrainableSlicedLinear(linear, *args)

    monkeypatch.setattr("mobiquant.calibration.block.TrainableSlicedLinear", drawn_between)
    beside = calibrate_block(copy.deepcopy(block), inputs, block_kwargs, arch, config, progress=False)
    assert any(".router." in key for key in alone.state)
    for key, tensor in alone.state.items():
        assert torch.equal(tensor, beside.state[key]), key
