"""The grouped-GEMM prefill kernel's logic, executed on the CPU by tests/kernels/prefill_emulator.py, against
float64.

Small odd shapes: output rows that are not a multiple of the 128-row tile (and odd, so the scalar stores run),
precision groups longer than one 128-token tile, empty precision groups, slice counts outside 1..K (the host
clamps them), truncated checkpoints with gains for every slice count, fp16 and bf16. Each planted bug must make
the check fail. A stand-in device runs the host's ``launch_prefill`` through the emulator.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from mobiquant.kernels import _launch
from mobiquant.slicing import slice_weight
from tests.kernels.decode_emulator import EmulatorError
from tests.kernels.prefill_emulator import PLANTED_BUGS, emulate_prefill, run_prefill_kernel
from tests.kernels.test_emulator import float64_reference, token_errors
from tests.kernels.test_prefill_dequant import TOLERANCE, random_gains

# (name, out, in, group size, tokens, mix, dtype, stored slices, gained)
CASES = [
    ("fp16-19x96-g32-t37-routed-gains", 19, 96, 32, 37, "routed", torch.float16, 4, True),
    # One precision group of 150 tokens: two token tiles; two column blocks, the second partial.
    ("bf16-136x192-g64-t150-k2", 136, 192, 64, 150, "k2", torch.bfloat16, 4, False),
    # Only 1 and 4 slices: the empty groups in between own no tile.
    ("fp16-33x256-g128-t140-ends-gains", 33, 256, 128, 140, "ends", torch.float16, 4, True),
    # Counts 0 and 9 besides 1..2: the host clamps them into 1..2.
    ("fp16-24x320-g64-t20-stored2-clamped", 24, 320, 64, 20, "clamped", torch.float16, 2, False),
    ("bf16-19x128-g32-t17-stored3-gains", 19, 128, 32, 17, "routed", torch.bfloat16, 3, True),
    ("fp16-131x64-g64-t300-routed", 131, 64, 64, 300, "routed", torch.float16, 4, False),
]


def draw(out_features: int, in_features: int, group_size: int, tokens: int, mix: str, dtype: torch.dtype,
         stored: int, gained: bool, seed: int):  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    sliced = slice_weight(torch.randn(out_features, in_features, generator=generator) * 0.05, group_size, 4)
    sliced = sliced.truncate(stored)
    # Gains for all 4 slice counts on a truncated checkpoint, as a layer loaded with max_slices passes them.
    gains = random_gains(4, out_features, generator) if gained else None
    sliced.gains = None if gains is None else gains[:stored]
    x = torch.randn(tokens, in_features, generator=generator).to(dtype)
    if mix.startswith("k"):
        slices = torch.full((tokens,), int(mix[1]))
    elif mix == "ends":
        slices = 1 + (stored - 1) * torch.randint(0, 2, (tokens,), generator=generator)
    elif mix == "clamped":
        slices = torch.tensor([0, 9, 1, 2])[torch.randint(0, 4, (tokens,), generator=generator)]
    else:
        slices = torch.randint(1, stored + 1, (tokens,), generator=generator)
    return sliced, gains, x, slices


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_grouped_gemm_matches_float64(case: tuple) -> None:
    name, out_features, in_features, group_size, tokens, mix, dtype, stored, gained = case
    seed = zlib.crc32(name.encode())
    sliced, gains, x, slices = draw(out_features, in_features, group_size, tokens, mix, dtype, stored, gained, seed)
    got, writes = emulate_prefill(x, sliced.planes, sliced.scale, sliced.zero, slices, group_size, gains)
    assert (writes == 1).all(), f"outputs written {writes.min()}..{writes.max()} times (seed {seed})"
    errors = token_errors(got, float64_reference(x, sliced, slices.clamp(1, stored)))
    assert errors.max() <= TOLERANCE[dtype], f"per-token errors {errors.max():.2e} (seed {seed})"


@pytest.mark.parametrize("bug", sorted(PLANTED_BUGS))
def test_planted_grouped_gemm_bugs_are_caught(bug: str) -> None:
    # Odd rows (the scalar stores), every precision group present, a truncated checkpoint with 4 gain rows.
    sliced, gains, x, slices = draw(19, 96, 32, 37, "routed", torch.float16, 3, True, seed=5)
    try:
        got, writes = emulate_prefill(x, sliced.planes, sliced.scale, sliced.zero, slices, 32, gains,
                                      frozenset({bug}))  # fmt: skip
    except EmulatorError:
        return
    assert (writes == 1).all()
    errors = token_errors(got, float64_reference(x, sliced, slices))
    assert errors.max() > TOLERANCE[torch.float16], f"{bug} went unnoticed"


class EmulatedPrefillDevice:
    """Stands in for the loaded CUBIN: a launch of the grouped GEMM runs the emulator on the tensors whose
    addresses the host passed (the schedule's too, recorded as launch_prefill makes them), so the host's kernel
    name, grid, shared memory and argument order are checked."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.by_address = {t.data_ptr(): t for t in tensors}
        self.launches: list[tuple] = []
        self.host_schedule = _launch.prefill_schedule

    def schedule(self, slices: torch.Tensor, num_slices: int, out_features: int):
        order, offsets, grid = self.host_schedule(slices, num_slices, out_features)
        self.by_address.update({order.data_ptr(): order, offsets.data_ptr(): offsets})
        return order, offsets, grid

    def launch(self, kernel: str, grid: tuple[int, int], block: int, smem: int, args: tuple, types: tuple) -> None:
        self.launches.append((kernel, grid, block, smem))
        x, planes, scale, zero, gains, order, offsets, y = (self.by_address.get(a) for a in args[:8])
        out_features, in_features, num_slices, group_size = args[8:]
        dtype = {"mbq_prefill_f16": "float16", "mbq_prefill_bf16": "bfloat16"}[kernel]
        got, writes = run_prefill_kernel(dtype, grid, x, planes, scale, zero, gains, order, offsets, out_features,
                                         in_features, num_slices, group_size)  # fmt: skip
        assert (writes == 1).all()
        y.copy_(got)


@pytest.mark.parametrize(("dtype", "gained"), [(torch.float16, True), (torch.bfloat16, False)])
def test_host_launch_matches_the_kernel_contract(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                                 gained: bool) -> None:  # fmt: skip
    sliced, gains, x, slices = draw(131, 96, 32, 150, "routed", dtype, 4, gained, seed=11)
    out = torch.full((150, 131), float("nan"), dtype=dtype)
    device = EmulatedPrefillDevice([x, sliced.planes, sliced.scale, sliced.zero, out] + ([gains] if gained else []))
    monkeypatch.setattr(_launch, "device_kernels", lambda _device: device)
    monkeypatch.setattr(_launch, "prefill_schedule", device.schedule)
    _launch.launch_prefill(x, sliced.planes, sliced.scale, sliced.zero, slices, out, 32, gains)
    ((kernel, grid, block, smem),) = device.launches
    # 150 tokens in 4 precision groups: at most 2 + 3 token tiles; 131 rows: 2 column blocks.
    assert grid == (2, 5) and block == 256 and smem == _launch.PREFILL_SMEM_BYTES
    errors = token_errors(out.double(), float64_reference(x, sliced, slices))
    assert errors.max() <= TOLERANCE[dtype], (kernel, errors)
