"""CPU checks of the host side of the kernels and of the GPU entry points: what the review found wrong
in elastic_linear, the launcher and the scripts that a GPU machine runs from a bare checkout."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bench import kernel_speed
from mobiquant import kernels
from mobiquant.kernels import _launch
from mobiquant.layers import MoBiLinear
from mobiquant.slicing import slice_weight

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script", ["tests/kernels/test_gpu.py", "bench/kernel_speed.py", "bench/prefill_parts.py",
                                    "bench/stage_cost.py"])
def test_scripts_import_mobiquant_from_their_own_checkout(script: str, tmp_path: Path) -> None:
    """Run as scripts in isolated mode (no PYTHONPATH, no current directory on the path), both must import
    the mobiquant of the checkout they live in, not an installed one or none."""
    probe = (
        "import runpy, sys; runpy.run_path(sys.argv[1], run_name='probe'); import mobiquant; print(mobiquant.__file__)"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", probe, str(REPO_ROOT / script)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()).resolve() == REPO_ROOT / "mobiquant" / "__init__.py"


def test_bench_compiles_only_the_requested_architecture(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    assert kernel_speed.main(["--arch", "sm_80", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {entry["arch"] for entry in report["compile"]} == {"sm_80"}
    assert "NOT measured" in capsys.readouterr().out


def test_bench_refuses_an_unsupported_architecture_in_one_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        kernel_speed.main(["--arch", "sm_75"])
    assert stopped.value.code == 2
    assert "unsupported architecture 'sm_75'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("bytes_per_copy", "l2_bytes", "copies"),
    [(8 << 20, 50 << 20, 30), (29 << 20, 60 << 20, 9), (10 << 20, 100 << 20, 40), (1 << 30, 60 << 20, 2)],
)
def test_weight_rotation_covers_four_times_the_l2(bytes_per_copy: int, l2_bytes: int, copies: int) -> None:
    got = kernel_speed.rotation_copies(bytes_per_copy, l2_bytes)
    assert got == copies
    assert got * bytes_per_copy >= 4 * max(l2_bytes, 60 << 20)


def test_timing_rotates_through_every_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    class Event:
        def __init__(self, enable_timing: bool) -> None:
            del enable_timing

        def record(self) -> None:
            pass

        def elapsed_time(self, other: object) -> float:
            return 1.0

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    used: list[int] = []
    kernel_speed.timed(used.append, iters=10, graphs=False, copies=7)
    warmup, timed_calls = used[:7], used[7:]
    assert warmup == list(range(7))  # every copy runs once before timing (kernel loading, repacking)
    assert timed_calls == [i % 7 for i in range(10)]


def packed(out_features: int = 8, in_features: int = 64):  # -> SlicedWeight
    return slice_weight(torch.randn(out_features, in_features), group_size=32, num_slices=2)


@pytest.mark.parametrize("name", ["planes", "scale", "zero"])
def test_weights_on_another_device_are_a_one_line_error(name: str) -> None:
    sliced = packed()
    tensors = {"planes": sliced.planes, "scale": sliced.scale, "zero": sliced.zero}
    tensors[name] = tensors[name].to("meta")
    with pytest.raises(ValueError, match=f"^{name} is on meta but x is on cpu") as info:
        kernels.elastic_linear(torch.randn(2, 64), **tensors, slices=torch.ones(2, dtype=torch.long), group_size=32)
    assert "\n" not in str(info.value)


def test_misaligned_out_is_rejected() -> None:
    sliced = packed()
    out = torch.empty(2 * 8 + 1, dtype=torch.float16)[1:].view(2, 8)  # starts 2 bytes past the allocation
    assert out.data_ptr() % 4 == 2
    with pytest.raises(ValueError, match="4-byte boundary"):
        kernels.elastic_linear(
            torch.randn(2, 64).half(), sliced.planes, sliced.scale, sliced.zero, torch.ones(2), 32, out=out
        )


def test_slices_of_any_integer_type_and_layout_are_accepted() -> None:
    sliced = packed()
    x = torch.randn(3, 64)
    strided = torch.tensor([1, 9, 2, 9, 1], dtype=torch.int32)[::2]
    got = kernels.elastic_linear(x, sliced.planes, sliced.scale, sliced.zero, strided, 32)
    expected = kernels.reference_elastic_linear(x, sliced.planes, sliced.scale, sliced.zero, strided.long(), 32)
    assert torch.equal(got, expected)


def test_slice_counts_out_of_range_are_clamped_as_the_kernels_clamp_them() -> None:
    """0 and negative counts read one slice, counts above K read K: against each token's own float64 weight."""
    sliced = slice_weight(torch.randn(24, 64) * 0.05, group_size=32, num_slices=3)
    x = torch.randn(5, 64)
    got = kernels.elastic_linear(x, sliced.planes, sliced.scale, sliced.zero, torch.tensor([0, -3, 2, 4, 9]), 32)
    for t, k in enumerate([1, 1, 2, 3, 3]):
        expected = x[t].double() @ sliced.dequantize(k, torch.float64).T
        torch.testing.assert_close(got[t].double(), expected, rtol=1e-4, atol=1e-5)


class FakeContext(int):
    """A CUcontext stand-in: the driver's handles convert to int."""


class FakeDriver:
    """The few driver calls a launch makes, recorded in order; cuLaunchKernel fails on request."""

    def __init__(self, calls: list, current: FakeContext | None, fail_launch: bool = False) -> None:
        self.calls, self.current, self.fail_launch = calls, current, fail_launch
        self.CUresult = SimpleNamespace(CUDA_SUCCESS=0)

    def cuCtxGetCurrent(self) -> tuple:
        return (0, self.current)

    def cuCtxPushCurrent(self, context: str) -> tuple:
        self.calls.append(("push", context))
        return (0,)

    def cuCtxPopCurrent(self) -> tuple:
        self.calls.append(("pop",))
        return (0, "popped")

    def CUstream(self, handle: int) -> tuple:
        return ("stream", handle)

    def cuLaunchKernel(self, function: str, *args: object) -> tuple:
        self.calls.append(("launch", function, args[7]))
        return (700 if self.fail_launch else 0,)

    def cuGetErrorName(self, err: int) -> tuple:
        return (0, b"CUDA_ERROR_ILLEGAL_ADDRESS")

    def cuGetErrorString(self, err: int) -> tuple:
        return (0, b"an illegal memory access was encountered")


@pytest.mark.parametrize("fail_launch", [False, True])
def test_launch_runs_under_the_device_guard_on_that_device_stream(
    monkeypatch: pytest.MonkeyPatch, fail_launch: bool
) -> None:
    """The thread's current context is another one (or none): the device's is pushed, then popped."""
    calls: list = []
    monkeypatch.setattr(_launch, "_driver", lambda: FakeDriver(calls, FakeContext(7), fail_launch))

    @contextlib.contextmanager
    def device_guard(index: int) -> Iterator[None]:
        calls.append(("enter device", index))
        try:
            yield
        finally:
            calls.append(("exit device", index))

    monkeypatch.setattr(torch.cuda, "device", device_guard)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: SimpleNamespace(cuda_stream=1000 + index))
    device = object.__new__(_launch._DeviceKernels)
    device.index, device.context, device.functions = 1, FakeContext(11), {"kernel": "function"}
    launch = contextlib.nullcontext() if not fail_launch else pytest.raises(_launch.DriverError, match="ILLEGAL")
    with launch:
        device.launch("kernel", (1, 1), 128, 0, (), ())
    assert calls == [
        ("enter device", 1),
        ("push", 11),
        ("launch", "function", ("stream", 1001)),
        ("pop",),  # also after a failed launch: the caller's context is current again
        ("exit device", 1),
    ]


def test_launch_leaves_an_already_current_context_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch's device guard the primary context is normally current already: no push or pop (fewer
    driver calls per launch, and none that a CUDA graph capture could object to)."""
    calls: list = []
    monkeypatch.setattr(_launch, "_driver", lambda: FakeDriver(calls, FakeContext(11)))
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: SimpleNamespace(cuda_stream=5))
    device = object.__new__(_launch._DeviceKernels)
    device.index, device.context, device.functions = 0, FakeContext(11), {"kernel": "function"}
    device.launch("kernel", (1, 1), 128, 0, (), ())
    assert calls == [("launch", "function", ("stream", 5))]


def test_row_gains_on_the_pytorch_path_match_the_gained_weights_in_float64() -> None:
    """The PyTorch path with gains against ``x (C + g_k (W_k - C))^T`` per token in float64 on a routed mix of
    slice counts; gains of the wrong shape or type are one-line errors (the kernels read float16)."""
    sliced = slice_weight(torch.randn(40, 128) * 0.05, group_size=64, num_slices=3)
    gains = (0.7 + 0.6 * torch.rand(3, 40)).half()
    x = torch.randn(9, 128)
    slices = torch.randint(1, 4, (9,))
    centre = (sliced.scale.double() * (2 - sliced.zero.double())).repeat_interleave(64, dim=1)
    expected = torch.empty(9, 40, dtype=torch.float64)
    for t in range(9):
        k = int(slices[t])
        gained = centre + gains[k - 1].double()[:, None] * (sliced.dequantize(k, torch.float64) - centre)
        expected[t] = x[t].double() @ gained.T
    routed = kernels.elastic_linear(x, sliced.planes, sliced.scale, sliced.zero, slices, 64, gains=gains)
    torch.testing.assert_close(routed.double(), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"gains must be \[K, 40\]"):
        kernels.elastic_linear(x, sliced.planes, sliced.scale, sliced.zero, slices, 64, gains=gains[:2])
    with pytest.raises(ValueError, match="gains must be float16"):
        kernels.elastic_linear(x, sliced.planes, sliced.scale, sliced.zero, slices, 64, gains=gains.float())


def test_the_layer_passes_a_count_its_setting_fixes_to_the_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """A uniform setting, a whole-number threshold or an int argument fixes every token's count on the host: the
    layer hands it to the product (whose prefill path then reads nothing back); a router's counts it does not."""
    from mobiquant import layers

    generator = torch.Generator().manual_seed(5)
    layer = MoBiLinear(64, 24, num_slices=4, group_size=32, router_hidden=8)
    layer.load_sliced(slice_weight(torch.randn(24, 64, generator=generator), group_size=32, num_slices=4))
    x = torch.randn(3, 5, 64, generator=generator)
    seen: list[int | None] = []
    product = layers._grouped_product

    def recording(layer_: MoBiLinear, flat_x: torch.Tensor, flat_k: torch.Tensor,
                  uniform: int | None = None) -> torch.Tensor:
        seen.append(uniform)
        if uniform is not None:
            assert bool((flat_k == uniform).all())
            # The same numbers as the product that reads the counts.
            assert torch.equal(product(layer_, flat_x, flat_k, uniform), product(layer_, flat_x, flat_k))
        return product(layer_, flat_x, flat_k, uniform)

    monkeypatch.setattr(layers, "_grouped_product", recording)
    layer.uniform_slices = 2
    layer(x)
    layer(x, 3)
    layer.uniform_slices, layer.threshold = None, 1.0  # a whole number: 3 slices, no router read
    layer(x)
    layer.threshold = 1.5
    layer(x)
    layer(x, torch.full((3, 5), 2))
    assert seen == [2, 3, 3, None, None]
