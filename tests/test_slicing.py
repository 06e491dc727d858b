"""MoBiSlice against an independent float64 implementation of the formulas in docs/method.md."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mobiquant.slicing import SliceShapeError, fit_row_gains, slice_weight


def reference_codes(weight: np.ndarray, scale: np.ndarray, zero: np.ndarray, k: int) -> np.ndarray:
    """``c_k = floor(clamp(W / s + z, 0, 4 - eps) * 4^(k-1))``, computed in float64 with numpy."""
    group = weight.shape[1] // scale.shape[1]
    s = np.repeat(scale.astype(np.float64), group, axis=1)
    z = np.repeat(zero.astype(np.float64), group, axis=1)
    u = weight.astype(np.float64) / s + z
    levels = 4.0 ** (k - 1)
    return np.clip(np.floor(u * levels), 0, 4.0 * levels - 1).astype(np.int64)


def reference_dequant(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, k: int) -> np.ndarray:
    """Shift-and-add form: ``s (q_1 + 0.5 - z) + sum_e s / 4^(e-1) (q_e - 1.5)``."""
    group = codes.shape[1] // scale.shape[1]
    s = np.repeat(scale.astype(np.float64), group, axis=1)
    z = np.repeat(zero.astype(np.float64), group, axis=1)
    out = s * (((codes >> (2 * (k - 1))) & 3) + 0.5 - z)
    for e in range(2, k + 1):
        q_e = (codes >> (2 * (k - e))) & 3
        out += s / 4.0 ** (e - 1) * (q_e - 1.5)
    return out


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_codes_and_weights_match_float64_reference(group_size: int) -> None:
    weight = torch.randn(48, 256) * torch.rand(48, 1) * 0.2
    sliced = slice_weight(weight, group_size=group_size, num_slices=4)
    w = weight.double().numpy()
    scale, zero = sliced.scale.double().numpy(), sliced.zero.double().numpy()
    for k in range(1, 5):
        codes = reference_codes(w, scale, zero, k)
        np.testing.assert_array_equal(sliced.codes(k).numpy(), codes)
        np.testing.assert_allclose(sliced.dequantize(k).double().numpy(), reference_dequant(codes, scale, zero, k),
                                   rtol=1e-6, atol=1e-7)


def test_truncation_never_rerounds() -> None:
    sliced = slice_weight(torch.randn(32, 128), group_size=64, num_slices=4)
    for k in range(2, 5):
        assert torch.equal(sliced.codes(k - 1), sliced.codes(k) >> 2)
        assert torch.equal(sliced.slice_codes(k), sliced.codes(k) - 4 * sliced.codes(k - 1))


def test_error_at_most_half_a_step_inside_clipping_range() -> None:
    weight = torch.randn(64, 256)
    sliced = slice_weight(weight, group_size=64, num_slices=4, clip=0.8)
    s = sliced.scale.double().repeat_interleave(64, dim=1)
    z = sliced.zero.double().repeat_interleave(64, dim=1)
    low, high = -z * s, (4 - z) * s
    inside = (weight.double() >= low) & (weight.double() < high)
    assert 0.5 < inside.double().mean() < 1.0, "clipping at 0.8 must leave some weights outside the range"
    for k in range(1, 5):
        error = (sliced.dequantize(k, torch.float64) - weight.double()).abs()
        half_step = s / 4 ** (k - 1) / 2
        assert bool((error[inside] <= half_step[inside] * (1 + 1e-6)).all())


def test_residual_slices_have_centred_zero_point() -> None:
    """``W_k - W_(k-1) = s / 4^(k-1) * (q_k - 1.5)``: no per-slice scale or zero is stored."""
    weight = torch.randn(16, 128)
    sliced = slice_weight(weight, group_size=64, num_slices=3)
    s = sliced.scale.double().repeat_interleave(64, dim=1)
    for k in range(2, 4):
        residual = sliced.dequantize(k, torch.float64) - sliced.dequantize(k - 1, torch.float64)
        expected = s / 4 ** (k - 1) * (sliced.slice_codes(k).double() - 1.5)
        torch.testing.assert_close(residual, expected, rtol=1e-5, atol=1e-6)


def test_storage_is_two_bits_per_slice_plus_group_parameters() -> None:
    sliced = slice_weight(torch.randn(64, 512), group_size=128, num_slices=4)
    assert sliced.planes.dtype == torch.int32 and sliced.planes.shape == (8, 64, 16)
    assert sliced.bits_per_weight() == pytest.approx(8 + 32 / 128)
    assert sliced.truncate(2).bits_per_weight() == pytest.approx(4 + 32 / 128)
    assert torch.equal(sliced.truncate(2).codes(2), sliced.codes(2))


def test_bit_planes_are_msb_first_and_column_ordered() -> None:
    """Plane 0 holds the top bit of c_K; bit j of word w is column 32 w + j."""
    weight = torch.randn(4, 64)
    sliced = slice_weight(weight, group_size=64, num_slices=2)
    codes = sliced.codes(2)
    for plane in range(4):
        words = sliced.planes[plane].to(torch.int64) & 0xFFFFFFFF
        for column in (0, 5, 31, 32, 63):
            bit = (words[:, column // 32] >> (column % 32)) & 1
            assert torch.equal(bit, (codes[:, column] >> (3 - plane)) & 1)


@pytest.mark.parametrize("in_features", [100, 96 + 64])
def test_bad_group_size_is_a_clear_error(in_features: int) -> None:
    with pytest.raises(SliceShapeError, match="multiple"):
        slice_weight(torch.randn(8, in_features), group_size=128)


def test_non_finite_weight_is_refused() -> None:
    weight = torch.randn(8, 64)
    weight[3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        slice_weight(weight, group_size=64)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 5),
    groups=st.integers(1, 3),
    magnitude=st.sampled_from([1e-30, 1e-6, 1.0, 1e3]),
    outlier=st.sampled_from([0.0, 1e2, 1e4]),
    constant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_odd_shapes_and_extreme_values(
    rows: int, groups: int, magnitude: float, outlier: float, constant: bool, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, 32 * groups, generator=generator, dtype=torch.float64) * magnitude
    if constant:
        weight[:, :32] = weight[0, 0]
    if outlier:
        weight[0, -1] = outlier * max(magnitude, 1e-3)
    if float(weight.max() - weight.min()) / 4 > 65504:
        with pytest.raises(ValueError, match="overflow the float16 group scale"):
            slice_weight(weight.float(), group_size=32, num_slices=4)
        return
    sliced = slice_weight(weight.float(), group_size=32, num_slices=4)
    assert torch.isfinite(sliced.scale.float()).all() and torch.isfinite(sliced.zero.float()).all()
    for k in range(1, 5):
        assert torch.isfinite(sliced.dequantize(k)).all()
        if k > 1:
            assert torch.equal(sliced.codes(k - 1), sliced.codes(k) >> 2)
    # Inside the stored range every weight is within half a step of its precision. (The worst error need
    # not fall with k: a constant group can sit near a 1-slice midpoint and between 2-slice points.)
    stored = weight.float().double()
    scale = sliced.scale.double().repeat_interleave(32, dim=-1)
    u = stored / scale + sliced.zero.double().repeat_interleave(32, dim=-1)
    inside = (u >= 0) & (u < 4)
    for k in range(1, 5):
        error = (sliced.dequantize(k, torch.float64) - stored).abs()
        assert bool((error <= 0.5 * scale / 4 ** (k - 1) * (1 + 1e-6) + 1e-30)[inside].all())


def test_row_gains_are_the_least_squares_amplitude_of_each_row() -> None:
    """``fit_row_gains`` against numpy's least squares on the inputs themselves, and the gained weight against
    ``C + g (W_k - C)`` in float64."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    weight = torch.randn(24, 128, generator=gen) * 0.1
    inputs = torch.randn(300, 128, generator=gen) * torch.rand(128, generator=gen) + torch.randn(128, generator=gen)
    sliced = slice_weight(weight, group_size=64, num_slices=3, clip=0.7)
    gains = fit_row_gains(weight, inputs.T @ inputs, sliced)
    assert gains.shape == (3, 24) and gains.dtype == torch.float16
    scale, zero = sliced.scale.double().numpy(), sliced.zero.double().numpy()
    centre = np.repeat(scale * (2.0 - zero), 64, axis=1)
    x = inputs.double().numpy()
    for k in range(1, 4):
        deviation = reference_dequant(sliced.codes(k).numpy(), scale, zero, k) - centre
        for row in range(24):
            expected = np.linalg.lstsq(x @ deviation[row][:, None], x @ (weight.double().numpy()[row] - centre[row]),
                                       rcond=None)[0][0]
            assert abs(float(gains[k - 1, row]) - expected) <= 1e-3 * abs(expected)
        sliced.gains = gains
        gained = centre + gains[k - 1].double().numpy()[:, None] * deviation
        np.testing.assert_allclose(sliced.dequantize(k, torch.float64).numpy(), gained, rtol=1e-5, atol=1e-7)
        sliced.gains = None
    # The least-squares gains can only lower the output error (gain 1 is the plain weight).
    plain = [np.linalg.norm(x @ (reference_dequant(sliced.codes(1).numpy(), scale, zero, 1) - weight.numpy()).T)]
    sliced.gains = gains
    plain.append(np.linalg.norm(x @ (sliced.dequantize(1, torch.float64).numpy() - weight.double().numpy()).T))
    assert plain[1] < plain[0]


def test_row_gains_of_a_row_the_inputs_never_reach_stay_one() -> None:
    weight = torch.randn(4, 64)
    sliced = slice_weight(weight, group_size=64, num_slices=2)
    assert torch.equal(fit_row_gains(weight, torch.zeros(64, 64), sliced), torch.ones(2, 4, dtype=torch.float16))


def test_row_gains_up_to_a_slice_count_leave_the_finer_ones_at_one() -> None:
    weight = torch.randn(8, 64)
    inputs = torch.randn(100, 64)
    sliced = slice_weight(weight, group_size=32, num_slices=4, clip=0.6)
    every = fit_row_gains(weight, inputs.T @ inputs, sliced)
    first_two = fit_row_gains(weight, inputs.T @ inputs, sliced, 2)
    assert torch.equal(first_two[:2], every[:2]) and torch.equal(first_two[2:], torch.ones(2, 8, dtype=torch.float16))
