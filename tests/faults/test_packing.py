"""Property-based tests of bit-plane packing and slicing on odd shapes and extreme values."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mobiquant.slicing import WORD_BITS, pack_codes, slice_weight, unpack_codes


@settings(max_examples=60, deadline=None)
@given(
    num_slices=st.integers(1, 4),
    rows=st.integers(1, 7),
    words=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip_and_prefixes(num_slices: int, rows: int, words: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 4**num_slices, (rows, words * WORD_BITS), generator=generator)
    planes = pack_codes(codes, num_slices)
    assert planes.dtype == torch.int32 and planes.shape == (2 * num_slices, rows, words)
    assert torch.equal(unpack_codes(planes, num_slices), codes)
    for k in range(1, num_slices):
        # The first 2k planes alone hold the k most significant slices: what a truncated checkpoint keeps.
        assert torch.equal(unpack_codes(planes[: 2 * k], k), codes >> (2 * (num_slices - k)))


@pytest.mark.parametrize("num_slices", [1, 2, 3, 4])
def test_every_code_value_survives_packing(num_slices: int) -> None:
    values = torch.arange(4**num_slices)
    width = -(-values.numel() // WORD_BITS) * WORD_BITS
    codes = values.repeat(width // values.numel() + 1)[:width].view(1, -1)
    codes = torch.cat([codes, codes.flip(1)])
    assert torch.equal(unpack_codes(pack_codes(codes, num_slices), num_slices), codes)


def test_sign_bit_words_round_trip() -> None:
    """All-ones words need bit 31, i.e. a negative int32: the wrap must be exact."""
    codes = torch.full((3, 64), 255)
    planes = pack_codes(codes, 4)
    assert (planes == -1).all()
    assert torch.equal(unpack_codes(planes, 4), codes)


def test_too_few_planes_is_a_clear_error() -> None:
    planes = pack_codes(torch.zeros(2, 32, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="need 6 bit planes"):
        unpack_codes(planes, 3)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 4),
    groups=st.integers(1, 3),
    kind=st.sampled_from(["denormal", "all-equal", "huge-outlier", "zero", "mixed-signs-denormal"]),
    seed=st.integers(0, 2**16),
)
def test_slicing_extreme_values(rows: int, groups: int, kind: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, 32 * groups, generator=generator)
    if kind == "denormal":
        weight = weight.abs() * 1e-40
    elif kind == "mixed-signs-denormal":
        weight = weight * 1e-42
    elif kind == "all-equal":
        weight = torch.full_like(weight, float(weight[0, 0]))
    elif kind == "huge-outlier":
        weight[0, 0] = 3e4
    else:
        weight = torch.zeros_like(weight)
    sliced = slice_weight(weight, group_size=32, num_slices=4)
    errors = []
    for k in range(1, 5):
        approx = sliced.dequantize(k, torch.float64)
        assert torch.isfinite(approx).all()
        assert int(sliced.codes(k).min()) >= 0 and int(sliced.codes(k).max()) < 4**k
        errors.append(float((approx - weight.double()).abs().max()))
    if kind in ("all-equal", "zero"):
        # A constant group gets the smallest scale: every slice count is within float16 rounding of the value
        # (so the error need not shrink with more slices; it is already at the floor).
        assert max(errors) <= abs(float(weight[0, 0])) * 1e-3 + 1e-7
    else:
        assert all(later <= earlier * (1 + 1e-6) + 1e-30 for earlier, later in itertools.pairwise(errors))


def test_plane_layout_matches_a_bit_by_bit_reference() -> None:
    """Plane p holds bit 2K-1-p of every code (most significant first); word w's bit i is column 32 w + i."""
    num_slices, rows, cols = 3, 4, 2 * WORD_BITS
    codes = torch.randint(0, 4**num_slices, (rows, cols), generator=torch.Generator().manual_seed(
        int(torch.randint(0, 2**31, ()))))
    planes = pack_codes(codes, num_slices)
    for plane in range(2 * num_slices):
        for row in range(rows):
            for word in range(cols // WORD_BITS):
                value = sum(((int(codes[row, word * WORD_BITS + i]) >> (2 * num_slices - 1 - plane)) & 1) << i
                            for i in range(WORD_BITS))
                assert int(planes[plane, row, word]) & 0xFFFFFFFF == value


def test_codes_in_any_integer_dtype_and_layout_pack_alike() -> None:
    codes = torch.randint(0, 4**3, (2 * WORD_BITS, 5))
    transposed = codes.to(torch.int32).T  # a non-contiguous int32 view
    assert torch.equal(pack_codes(transposed, 3), pack_codes(codes.T.contiguous(), 3))
