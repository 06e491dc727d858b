"""The activation-aware clip search against float64 brute force, and its effect on calibration."""

import itertools

import pytest
import torch

from mobiquant.calibration import CalibrationConfig
from mobiquant.clip_search import (
    CLIP_GRID,
    clip_logit,
    group_hessian_blocks,
    group_output_errors,
    input_hessians,
    search_clipping,
)
from mobiquant.slicing import slice_weight
from tests.test_method import heavy_tailed_block, one_slice_block_error

GROUP = 32


def heavy_tailed(rows: int, cols: int) -> torch.Tensor:
    return torch.distributions.StudentT(2.5).sample((rows, cols)) * 0.02


def reference_errors(weight: torch.Tensor, x: torch.Tensor, upper: float, lower: float, k: int) -> torch.Tensor:
    """``[out, groups]`` output error of each group, in float64 straight from the inputs ``x``."""
    w_k = slice_weight(weight, GROUP, 4, clip=(torch.full((weight.shape[0], weight.shape[1] // GROUP), upper),
                                                torch.full((weight.shape[0], weight.shape[1] // GROUP), lower)))
    diff = (w_k.dequantize(k, torch.float64) - weight.double()).reshape(weight.shape[0], -1, GROUP)
    x_groups = x.double().reshape(len(x), -1, GROUP)
    return torch.einsum("tgi,rgi->trg", x_groups, diff).pow(2).sum(0)


def test_hessian_blocks_are_the_diagonal_group_blocks() -> None:
    x = torch.randn(50, 96, dtype=torch.float64)
    hessian = x.T @ x
    blocks = group_hessian_blocks(hessian, GROUP)
    for g in range(3):
        torch.testing.assert_close(blocks[g], hessian[g * GROUP : (g + 1) * GROUP, g * GROUP : (g + 1) * GROUP])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_group_errors_match_float64_output_errors(k: int) -> None:
    weight, x = heavy_tailed(12, 96), torch.randn(200, 96) * torch.rand(96) * 3
    blocks = group_hessian_blocks(x.double().T @ x.double(), GROUP)
    for upper, lower in [(1.0, 1.0), (0.7, 0.9), (0.5, 0.6)]:
        errors = group_output_errors(weight, blocks.float(), GROUP, upper, lower, [k])[0]
        torch.testing.assert_close(errors.double(), reference_errors(weight, x, upper, lower, k), rtol=2e-3, atol=1e-6)


def test_search_beats_every_symmetric_factor_and_no_upper_change_improves_it() -> None:
    weight, x = heavy_tailed(6, 64), torch.randn(120, 64)
    weights = {1: 1.0, 2: float(torch.randint(1, 40, ()))}
    upper, lower = search_clipping(weight, x.double().T @ x.double(), GROUP, weights)
    candidates = [1.0, *CLIP_GRID]
    objective = {
        (a, b): sum(w * reference_errors(weight, x, a, b, k) for k, w in weights.items())
        for a, b in itertools.product(candidates, candidates)
    }
    for r, g in itertools.product(range(6), range(2)):
        chosen_upper, chosen_lower = round(float(upper[r, g]), 2), round(float(lower[r, g]), 2)
        chosen = float(objective[(chosen_upper, chosen_lower)][r, g])
        # Float64 reference of the search's guarantees: no worse than the best symmetric factor, and the
        # last line search (over the upper factor) leaves no better upper factor for the chosen lower one.
        assert chosen <= min(float(objective[(c, c)][r, g]) for c in candidates) * (1 + 2e-3) + 1e-12
        assert chosen <= min(float(objective[(c, chosen_lower)][r, g]) for c in candidates) * (1 + 2e-3) + 1e-12


def test_two_bit_objective_clips_harder_than_four_bit() -> None:
    weight, x = heavy_tailed(64, 128), torch.randn(300, 128)
    hessian = x.double().T @ x.double()
    upper_2bit, lower_2bit = search_clipping(weight, hessian, GROUP, {1: 1.0})
    upper_4bit, lower_4bit = search_clipping(weight, hessian, GROUP, {2: 1.0})
    assert float(upper_2bit.mean()) < float(upper_4bit.mean()) - 0.05
    assert float(lower_2bit.mean()) < float(lower_4bit.mean()) - 0.05
    clipped = slice_weight(weight, GROUP, 4, clip=(upper_2bit, lower_2bit)).dequantize(1, torch.float64)
    searched = (x.double() @ (clipped - weight.double()).T).pow(2).sum()
    unclipped = (x.double() @ (slice_weight(weight, GROUP, 4).dequantize(1, torch.float64) - weight.double()).T)
    assert float(searched) < 0.95 * float(unclipped.pow(2).sum())


def test_search_rejects_an_empty_or_negative_objective() -> None:
    weight, hessian = torch.randn(4, 64), torch.eye(64)
    with pytest.raises(ValueError, match="slice_weights"):
        search_clipping(weight, hessian, GROUP, {})
    with pytest.raises(ValueError, match="slice_weights"):
        search_clipping(weight, hessian, GROUP, {1: -1.0})
    with pytest.raises(ValueError, match="clip_search_weights"):
        CalibrationConfig(clip_search_weights=(0.0, 0.0, 0.0, 0.0))


def test_clip_logit_inverts_the_sigmoid() -> None:
    factors = torch.rand(100) * 0.98 + 0.01
    torch.testing.assert_close(torch.sigmoid(clip_logit(factors)), factors)


def test_input_hessians_sum_every_batch_and_return_the_result() -> None:
    linear = torch.nn.Linear(16, 4)
    batches = [torch.randn(3, 5, 16) for _ in range(3)]
    sums, result = input_hessians({"fc": linear}, lambda: [linear(b) for b in batches][-1])
    flat = torch.cat([b.reshape(-1, 16) for b in batches]).double()
    torch.testing.assert_close(sums["fc"], flat.T @ flat)
    torch.testing.assert_close(result, linear(batches[-1]))


def test_searched_start_lowers_the_two_bit_block_error() -> None:
    setup = heavy_tailed_block(lambda shape: heavy_tailed(*shape))
    errors = {
        search: one_slice_block_error(setup, CalibrationConfig(group_size=GROUP, epochs_stage1=0, epochs_stage2=0,
                                                                 target_bits=2.0, clip_search=search,
                                                                 error_compensation=False))
        for search in (False, True)
    }
    assert errors[True] < 0.97 * errors[False], errors
