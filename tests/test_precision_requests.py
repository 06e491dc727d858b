"""Precision requests a user can get wrong, slice counts beyond 4, and budgets on a model holding fewer slices."""

from __future__ import annotations

import copy

import pytest
import torch

from mobiquant.checkpoint import mobi_layers
from mobiquant.layers import MoBiLinear
from mobiquant.precision import calibrate_thresholds, hold_budget, set_precision, track_bits
from mobiquant.slicing import MAX_SLICES, slice_weight
from tests.tiny_models import VOCAB, quantize_tiny, tiny_model


@pytest.fixture(scope="module")
def calibrated() -> tuple[torch.nn.Module, torch.Tensor]:
    """A tiny Llama whose threshold tables are calibrated (with the bit allocation) on ``samples``."""
    model = quantize_tiny(tiny_model("llama", seed=1), seed=1)
    samples = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    calibrate_thresholds(model, samples)
    return model, samples


def measured_bits(model: torch.nn.Module, samples: torch.Tensor, **setting: float) -> float:
    set_precision(model, **setting)
    with track_bits(model) as meter, torch.no_grad():
        model(samples)
    return meter.avg_bits


def test_slice_counts_are_whole_numbers_up_to_exact_16_bit_codes() -> None:
    weight = torch.randn(8, 64)
    for bad in (0, MAX_SLICES + 1, 27, 2.5, True):
        with pytest.raises(ValueError, match=rf"num_slices must be a whole number in 1\.\.{MAX_SLICES}"):
            slice_weight(weight, 32, bad)
        with pytest.raises(ValueError, match="num_slices must be a whole number"):
            MoBiLinear(64, 8, num_slices=bad, group_size=32)
    assert MAX_SLICES == 8


@pytest.mark.parametrize("num_slices", [5, 6, 8])
def test_layers_beyond_one_byte_of_codes_rebuild_their_exact_weights(num_slices: int) -> None:
    weight = torch.randn(16, 64)
    sliced = slice_weight(weight, 32, num_slices)
    layer = MoBiLinear(64, 16, num_slices=num_slices, group_size=32, router_hidden=None)
    layer.load_sliced(sliced)
    for k in range(1, num_slices + 1):
        # SlicedWeight.dequantize reads the codes straight from the planes, as int64.
        assert torch.equal(layer.dense_weight(k, torch.float32), sliced.dequantize(k)), k


def test_precision_arguments_of_the_wrong_kind_are_refused(calibrated: tuple) -> None:
    model, _ = calibrated
    with pytest.raises(TypeError, match=r"slices must be a whole number of slices, got 2\.5"):
        set_precision(model, slices=2.5)
    with pytest.raises(TypeError, match="slices must be a whole number"):
        set_precision(model, slices=True)
    with pytest.raises(TypeError, match=r"avg_bits must be a number of bits such as 3\.5, got str '3'"):
        set_precision(model, avg_bits="3")
    with pytest.raises(ValueError, match="avg_bits must be in"):
        set_precision(model, avg_bits=float("nan"))
    # Whole numbers of other integer and real types are fine.
    assert measured_bits(model, torch.randint(0, VOCAB, (1, 8)), slices=torch.tensor(2).item()) == 4.0


def test_full_model_budgets_are_unchanged_and_exact(calibrated: tuple) -> None:
    model, samples = calibrated
    for bits in (2.5, 3.0, 3.5, 4.0):
        assert measured_bits(model, samples, avg_bits=bits) == pytest.approx(bits, abs=0.02)


def test_budgets_between_half_bits_are_spent_as_asked(calibrated: tuple) -> None:
    # A layer's threshold is not linear in bits: between points 0.5 bits apart a layer whose share grows by a
    # whole slice kept its lower count over most of the interval, and such budgets were spent short.
    model, samples = calibrated
    asked = (2.625, 2.75, 3.125, 3.375, 4.25, 4.75, 5.375, 6.875, 7.625)
    spent = [measured_bits(model, samples, avg_bits=bits) for bits in asked]
    assert spent == pytest.approx(asked, abs=0.04)


def test_budgets_on_two_held_slices_are_capped_and_reallocated(calibrated: tuple) -> None:
    full, samples = calibrated
    # As loaded with max_slices=2: the first two slices of every layer, the full model's tables.
    model = copy.deepcopy(full)
    for layer in mobi_layers(model).values():
        layer.keep_slices(2)
    with pytest.raises(ValueError, match=r"avg_bits must be in \[2, 4\] \(2 slices held in memory\), got 4\.5"):
        set_precision(model, avg_bits=4.5)
    with pytest.raises(ValueError, match=r"slices must be in 1\.\.2"):
        set_precision(model, slices=3)
    assert measured_bits(model, samples, avg_bits=4.0) == 4.0
    measured = [measured_bits(model, samples, avg_bits=bits) for bits in (2.5, 3.0, 3.5)]
    # Capping each layer's share at 2 slices without moving the others runs 2.33 / 2.69 / 3.17 bits here.
    assert measured == pytest.approx([2.5, 3.0, 3.5], abs=0.2)
    assert measured == sorted(measured)


def test_nested_bit_tracking_keeps_the_outer_count(calibrated: tuple) -> None:
    model, samples = calibrated
    set_precision(model, slices=1)
    with track_bits(model) as outer, torch.no_grad():
        model(samples)
        set_precision(model, slices=4)
        with track_bits(model) as inner:
            model(samples)
        set_precision(model, slices=1)
        model(samples)
    assert inner.avg_bits == 8.0
    # Three equal passes at 2, 8 and 2 bits.
    assert outer.avg_bits == pytest.approx(4.0)
    assert all(layer.bit_meters == [] for layer in mobi_layers(model).values())


def shifted_domain(model: torch.nn.Module, shift: float) -> torch.nn.Module:
    """A copy whose router scores all sit ``shift`` lower on their slice-major scale than on the text the
    thresholds were fitted on (as on text of another domain): the same tables then spend other bits."""
    shifted = copy.deepcopy(model)
    for layer in mobi_layers(shifted).values():
        layer.thresholds = (layer.thresholds + shift).clamp(0.0, layer.num_slices - 1.0)
    return shifted


@pytest.mark.parametrize(("shift", "bits"), [(0.3, 3.0), (-0.25, 3.5), (0.3, 2.5)])
def test_a_held_budget_spends_the_bits_asked_for_on_shifted_scores(calibrated: tuple, shift: float,
                                                                    bits: float) -> None:
    model, samples = calibrated
    shifted = shifted_domain(model, shift)
    unheld = measured_bits(shifted, samples, avg_bits=bits)
    assert abs(unheld - bits) > 0.1  # the shift moves the spend: there is something to hold
    set_precision(shifted, avg_bits=bits)
    with torch.no_grad():
        expected_first = shifted(samples).logits
    passes = 24
    with hold_budget(shifted, bits, horizon_tokens=samples.numel()) as hold, torch.no_grad():
        start = hold.budget
        # Causal: the first pass runs at the tables' own budget, exactly as set_precision.
        assert torch.equal(shifted(samples).logits, expected_first)
        for _ in range(passes - 1):
            shifted(samples)
    # Integral feedback with a full step per pass: what the passes spent sums to the target, less the budget's
    # movement (the bits per pass jump between the few steps a tiny model has, so no single pass hits it).
    assert hold.meter.avg_bits == pytest.approx(bits - (hold.budget - start) / passes, abs=1e-9)
    assert hold.meter.avg_bits == pytest.approx(bits, abs=0.05)
    assert (hold.budget - bits) * shift > 0
    layers = mobi_layers(shifted).values()
    assert all(layer.bit_meters == [] for layer in layers)
    # Released: the budget no longer moves.
    thresholds = [layer.threshold for layer in layers]
    with torch.no_grad():
        shifted(samples)
    assert [layer.threshold for layer in layers] == thresholds


def test_a_held_budget_follows_single_tokens_and_set_precision_releases_it(calibrated: tuple) -> None:
    model, samples = calibrated
    shifted = shifted_domain(model, 0.3)
    horizon = 64
    hold = hold_budget(shifted, 3.0, horizon_tokens=horizon)
    start = hold.budget
    tokens = samples.reshape(-1, 1).repeat(3, 1)
    with torch.no_grad():
        for token in tokens:
            shifted(token.unsqueeze(0))
    # One token moves the budget by 1/horizon of its error.
    assert hold.meter.avg_bits == pytest.approx(3.0 - (hold.budget - start) * horizon / len(tokens), abs=1e-9)
    assert hold.meter.avg_bits == pytest.approx(3.0, abs=0.1)
    set_precision(shifted, avg_bits=3.0)
    with torch.no_grad():
        before = [layer.threshold for layer in mobi_layers(shifted).values()]
        shifted(samples)
    assert [layer.threshold for layer in mobi_layers(shifted).values()] == before
    assert not hasattr(shifted, "_mobiquant_budget_hold")
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="horizon_tokens must be a whole number"):
            hold_budget(shifted, 3.0, horizon_tokens=bad)
    with pytest.raises(ValueError, match="avg_bits must be in"):
        hold_budget(shifted, 9.0)
