"""The decode kernel's logic, executed on the CPU by tests/kernels/decode_emulator.py, against float64.

Small odd shapes: rows that are not a multiple of the 16-row tile, inputs with a partial last 128-column
tile, group sizes 32, 64, 128 and 256 (the per-span and per-tile affine kernels), 1-16 tokens (one and two
8-token n-tiles), uniform and routed slice counts, truncated checkpoints, fp16 and bf16. Each planted bug
must make the check fail.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from mobiquant.kernels import _launch, _repack
from mobiquant.slicing import slice_weight, unpack_codes
from tests.kernels.decode_emulator import PLANTED_BUGS, EmulatorError, emulate_decode, run_decode_kernel

TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 1e-2}  # per-token relative error (issue 4's contract)

# (name, out, in, group size, tokens, mix, dtype, stored slices)
CASES = [
    ("fp16-19x256-g128-t1-k1", 19, 256, 128, 1, "k1", torch.float16, 4),
    ("fp16-19x256-g128-t1-k2", 19, 256, 128, 1, "k2", torch.float16, 4),
    ("fp16-19x256-g128-t3-k3", 19, 256, 128, 3, "k3", torch.float16, 4),
    ("fp16-19x256-g128-t5-k4", 19, 256, 128, 5, "k4", torch.float16, 4),
    ("fp16-40x320-g64-t7-routed", 40, 320, 64, 7, "routed", torch.float16, 4),
    ("fp16-33x416-g32-t13-routed", 33, 416, 32, 13, "routed", torch.float16, 4),
    ("fp16-17x1152-g128-t16-routed", 17, 1152, 128, 16, "routed", torch.float16, 4),
    ("fp16-24x512-g256-t9-ends", 24, 512, 256, 9, "ends", torch.float16, 4),
    ("fp16-40x384-g128-t4-stored2", 40, 384, 128, 4, "routed", torch.float16, 2),
    ("fp16-21x96-g32-t2-stored3", 21, 96, 32, 2, "routed", torch.float16, 3),
    # 8 whole tiles and a partial ninth: the tail belongs to a warp that also ran the loop.
    ("fp16-3x1056-g32-t12-stored1", 3, 1056, 32, 12, "routed", torch.float16, 1),
    ("fp16-9x2336-g32-t4-routed", 9, 2336, 32, 4, "routed", torch.float16, 4),
    ("fp16-1x32-g32-t1-k1", 1, 32, 32, 1, "k1", torch.float16, 4),
    ("bf16-19x256-g128-t1-k1", 19, 256, 128, 1, "k1", torch.bfloat16, 4),
    ("bf16-40x320-g64-t6-k2", 40, 320, 64, 6, "k2", torch.bfloat16, 4),
    ("bf16-19x384-g128-t3-k3", 19, 384, 128, 3, "k3", torch.bfloat16, 4),
    ("bf16-33x416-g32-t11-k4", 33, 416, 32, 11, "k4", torch.bfloat16, 4),
    ("bf16-24x256-g128-t16-routed", 24, 256, 128, 16, "routed", torch.bfloat16, 4),
    ("bf16-9x1088-g64-t9-routed", 9, 1088, 64, 9, "routed", torch.bfloat16, 4),
]


def draw(out_features: int, in_features: int, group_size: int, tokens: int, mix: str, dtype: torch.dtype,
         stored: int, seed: int):  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    sliced = slice_weight(weight, group_size=group_size, num_slices=4).truncate(stored)
    x = torch.randn(tokens, in_features, generator=generator).to(dtype)
    if mix.startswith("k"):
        slices = torch.full((tokens,), int(mix[1]), dtype=torch.int64)
    elif mix == "ends":
        slices = 1 + (stored - 1) * torch.randint(0, 2, (tokens,), generator=generator)
    else:
        slices = torch.randint(1, stored + 1, (tokens,), generator=generator)
    return sliced, x, slices


def float64_reference(x: torch.Tensor, sliced, slices: torch.Tensor) -> torch.Tensor:
    """x[t] @ W_{k_t}^T with W_k = s * ((c_k + 0.5) / 4^(k-1) - z), from the planes by mobiquant.slicing; with
    row gains g, C + g_k (W_k - C) where C = s * (2 - z)."""
    s = sliced.scale.double().repeat_interleave(sliced.group_size, dim=1)
    z = sliced.zero.double().repeat_interleave(sliced.group_size, dim=1)
    out = torch.empty(x.shape[0], sliced.planes.shape[1], dtype=torch.float64)
    for k in slices.unique().tolist():
        weight = s * ((unpack_codes(sliced.planes, k).double() + 0.5) / 4 ** (k - 1) - z)
        if sliced.gains is not None:
            weight = s * (2 - z) + sliced.gains[k - 1].double()[:, None] * (weight - s * (2 - z))
        rows = slices == k
        out[rows] = x[rows].double() @ weight.T
    return out


def token_errors(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    return (got - expected).norm(dim=1) / expected.norm(dim=1).clamp_min(1e-12)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_decode_kernel_matches_float64(case: tuple) -> None:
    _, out_features, in_features, group_size, tokens, mix, dtype, stored = case
    seed = zlib.crc32(case[0].encode())
    sliced, x, slices = draw(out_features, in_features, group_size, tokens, mix, dtype, stored, seed)
    got, writes = emulate_decode(x, sliced.planes, sliced.scale, sliced.zero, slices, group_size)
    assert (writes == 1).all(), f"outputs written {writes.min()}..{writes.max()} times (seed {seed})"
    errors = token_errors(got, float64_reference(x, sliced, slices))
    assert errors.max() <= TOLERANCE[dtype], f"per-token errors {errors.tolist()} (seed {seed})"


@pytest.mark.parametrize(("in_features", "group_size", "tokens", "dtype"),
                         [(320, 64, 7, torch.float16), (384, 128, 12, torch.bfloat16), (1056, 32, 3, torch.float16)])
def test_row_gains_folded_into_the_group_parameters_match_float64(
    in_features: int, group_size: int, tokens: int, dtype: torch.dtype
) -> None:
    """A v2 checkpoint's row gains cost the kernel nothing: the repacked (s, b_k) pairs carry them."""
    sliced, x, slices = draw(40, in_features, group_size, tokens, "routed", dtype, 4, seed=tokens)
    sliced.gains = (0.7 + 0.6 * torch.rand(4, 40, generator=torch.Generator().manual_seed(tokens))).half()
    got, writes = emulate_decode(x, sliced.planes, sliced.scale, sliced.zero, slices, group_size, gains=sliced.gains)
    assert (writes == 1).all()
    errors = token_errors(got, float64_reference(x, sliced, slices))
    assert errors.max() <= TOLERANCE[dtype], errors
    plain = token_errors(emulate_decode(x, sliced.planes, sliced.scale, sliced.zero, slices, group_size)[0],
                         float64_reference(x, sliced, slices))
    assert plain.max() > 10 * TOLERANCE[dtype]  # the gains matter in this check


@pytest.mark.parametrize("bug", sorted(PLANTED_BUGS))
def test_planted_bugs_are_caught(bug: str) -> None:
    # 18 whole tiles and a partial one for a warp that ran the loop, three row tiles, tokens at 1-4 slices.
    sliced, x, slices = draw(40, 2336, 32, 6, "routed", torch.float16, 4, seed=7)
    try:
        got, writes = emulate_decode(x, sliced.planes, sliced.scale, sliced.zero, slices, 32, frozenset({bug}))
    except EmulatorError:
        return  # the race or bounds check fired
    errors = token_errors(got, float64_reference(x, sliced, slices))
    assert (writes != 1).any() or errors.max() > TOLERANCE[torch.float16], f"{bug} went unnoticed: {errors}"


class EmulatedDevice:
    """Stands in for the loaded CUBIN: a launch of a decode kernel runs the emulator on the tensors
    whose addresses the host passed, so the host's kernel choice, grid and argument order are checked."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.by_address = {t.data_ptr(): t for t in tensors}
        self.launches: list[tuple] = []

    def launch(self, kernel: str, grid: tuple[int, int], block: int, smem: int, args: tuple, types: tuple) -> None:
        self.launches.append((kernel, grid, block, smem))
        x_ptr, packed_ptr, affine_ptr, slices_ptr, y_ptr, tokens, out_features, in_features, num_slices = args
        _, _, dtype, token_tile, group_mode = kernel.split("_")
        got, writes = run_decode_kernel(
            {"f16": "float16", "bf16": "bfloat16"}[dtype], int(token_tile[1:]) // 8, group_mode == "g32", grid[0],
            self.by_address[x_ptr], self.by_address[packed_ptr], self.by_address[affine_ptr],
            self.by_address[slices_ptr], tokens, out_features, in_features, num_slices,
        )  # fmt: skip
        assert (writes == 1).all()
        self.by_address[y_ptr].copy_(got)


@pytest.mark.parametrize(
    ("tokens", "in_features", "group_size", "dtype", "gained"),
    [(3, 320, 64, torch.float16, False), (12, 384, 128, torch.bfloat16, False), (5, 320, 64, torch.float16, True)],
)
def test_host_launch_matches_the_kernel_contract(
    monkeypatch: pytest.MonkeyPatch, tokens: int, in_features: int, group_size: int, dtype: torch.dtype, gained: bool
) -> None:
    sliced, x, slices = draw(40, in_features, group_size, tokens, "routed", dtype, 4, seed=tokens)
    if gained:
        sliced.gains = (0.7 + 0.6 * torch.rand(4, 40)).half()
    weights = _repack.decode_weights(sliced.planes, sliced.scale, sliced.zero, group_size, dtype, sliced.gains)
    out = torch.full((tokens, 40), float("nan"), dtype=dtype)
    device = EmulatedDevice([x, weights.packed, weights.affine, slices, out])
    monkeypatch.setattr(_launch, "device_kernels", lambda _device: device)
    _launch.launch_decode(x, sliced.planes, sliced.scale, sliced.zero, slices, out, group_size, sliced.gains)
    ((kernel, grid, block, smem),) = device.launches
    assert grid == (3, 1) and block == 256 and smem == 0
    errors = token_errors(out.double(), float64_reference(x, sliced, slices))
    assert errors.max() <= TOLERANCE[dtype], (kernel, errors)
