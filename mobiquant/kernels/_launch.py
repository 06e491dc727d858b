"""Loading the CUBINs and launching the kernels through the CUDA driver API (cuda.bindings.driver).

Tensors go in by ``data_ptr()``; launches are queued on torch's current stream of the inputs' device, so
they order with the surrounding PyTorch work and are captured by CUDA graphs like any torch kernel.
Each launch runs under torch's device guard, with the device's primary context pushed (and popped again)
when the guard has not made it current, so the caller's current device and context are what they were.
Nothing here reads a value back from the device, so a call never synchronises.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator

import torch

from ._compile import MODULES, compile_module
from ._repack import TILE_COLS, TILE_ROWS, decode_weights

# Must match the kernels' compile-time constants (decode.cu, prefill.cu).
DECODE_THREADS = 256  # 8 warps on one 16-row tile
DECODE_TOKENS_PER_TILE = 8  # the mma's N: the n8 kernels take 1-8 tokens, the n16 ones 9-16
PREFILL_THREADS = 256
DEQUANT_THREADS = 256  # one thread per row and 32-column word (dequant.cu)
PREFILL_BM = 128
PREFILL_BN = 128
PREFILL_SMEM_BYTES = 53760  # sizeof(PrefillSmem), checked by a static_assert in prefill.cu

_P = ctypes.c_void_p
_I = ctypes.c_int


class DriverError(RuntimeError):
    """A CUDA driver call failed."""


def _driver():  # -> module; imported lazily so that importing the package needs no driver
    from cuda.bindings import driver

    return driver


def _check(result: tuple) -> tuple:
    driver = _driver()
    err, *values = result
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        _, text = driver.cuGetErrorString(err)
        raise DriverError(f"{(name or b'?').decode()}: {(text or b'').decode()}")
    return tuple(values)


class _DeviceKernels:
    """The kernels of every module loaded into one device's primary context (the one torch uses)."""

    def __init__(self, index: int) -> None:
        driver = _driver()
        torch.cuda.init()
        _check(driver.cuInit(0))
        (device,) = _check(driver.cuDeviceGet(index))
        self.index = index
        (self.context,) = _check(driver.cuDevicePrimaryCtxRetain(device))
        major, minor = torch.cuda.get_device_capability(index)
        self.arch = f"sm_{major}{minor}"
        self.modules = []
        self.functions = {}
        with self.current():
            for name, (_, kernel_names) in MODULES.items():
                cubin, _ = compile_module(name, self.arch)
                (module,) = _check(driver.cuModuleLoadData(cubin))
                self.modules.append(module)
                for kernel in kernel_names:
                    (self.functions[kernel],) = _check(driver.cuModuleGetFunction(module, kernel.encode()))
            attribute = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            for kernel in MODULES["prefill"][1]:
                _check(driver.cuFuncSetAttribute(self.functions[kernel], attribute, PREFILL_SMEM_BYTES))

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        """This device as torch's current device and its primary context as the thread's, restored after.

        Driver calls act on the calling thread's current context, which a thread that has not yet touched
        CUDA (a data-loader or server thread) may not have. Torch's device guard normally makes the primary
        context current; when it is not, it is pushed and popped again, leaving the caller's own.
        """
        driver = _driver()
        with torch.cuda.device(self.index):
            (current,) = _check(driver.cuCtxGetCurrent())
            if current is not None and int(current) == int(self.context):
                yield
                return
            _check(driver.cuCtxPushCurrent(self.context))
            try:
                yield
            finally:
                _check(driver.cuCtxPopCurrent())

    def launch(self, kernel: str, grid: tuple[int, int], block: int, smem: int, args: tuple, types: tuple) -> None:
        driver = _driver()
        with self.current():
            stream = driver.CUstream(torch.cuda.current_stream(self.index).cuda_stream)
            _check(
                driver.cuLaunchKernel(
                    self.functions[kernel], grid[0], grid[1], 1, block, 1, 1, smem, stream, (args, types), 0
                )
            )


_devices: dict[int, _DeviceKernels] = {}
_lock = threading.Lock()


def device_kernels(device: torch.device) -> _DeviceKernels:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        if index not in _devices:
            _devices[index] = _DeviceKernels(index)
        return _devices[index]


def dtype_tag(dtype: torch.dtype) -> str:
    return {torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]


def gains_pointer(gains: torch.Tensor | None) -> int:
    """The kernels' ``gains`` argument: the address of contiguous float16 row gains, or null for none."""
    if gains is None:
        return 0
    if gains.dtype != torch.float16 or not gains.is_contiguous():
        raise ValueError(f"gains must be contiguous float16, got {gains.dtype}")
    return gains.data_ptr()


def launch_decode(
    x: torch.Tensor,
    planes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    slices: torch.Tensor,
    out: torch.Tensor,
    group_size: int,
    gains: torch.Tensor | None = None,
) -> None:
    """Decode kernel on up to 16 tokens; ``slices`` int64 on the device, read by the kernel itself. The
    weights (and row ``gains``, folded into the group parameters) are regrouped for it once
    (``_repack.decode_weights``) and cached with the weight tensors."""
    tokens, in_features = x.shape
    num_slices, out_features = planes.shape[0] // 2, planes.shape[1]
    token_tiles = -(-tokens // DECODE_TOKENS_PER_TILE)
    group_mode = 128 if group_size % TILE_COLS == 0 else 32
    weights = decode_weights(planes, scale, zero, group_size, x.dtype, gains)
    kernels = device_kernels(x.device)
    grid = (-(-out_features // TILE_ROWS), 1)
    args = (
        x.data_ptr(), weights.packed.data_ptr(), weights.affine.data_ptr(), slices.data_ptr(), out.data_ptr(),
        tokens, out_features, in_features, num_slices,
    )  # fmt: skip
    types = (_P, _P, _P, _P, _P, _I, _I, _I, _I)
    name = f"mbq_decode_{dtype_tag(x.dtype)}_n{8 * token_tiles}_g{group_mode}"
    kernels.launch(name, grid, DECODE_THREADS, 0, args, types)


def prefill_schedule(
    slices: torch.Tensor, num_slices: int, out_features: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The grouped GEMM's ``order`` (token indices sorted by slice count, int32), ``offsets`` ([K+1] int32:
    tokens with k slices are ``order[offsets[k-1]:offsets[k]]``) and grid, computed on ``slices``' device with
    no read-back to the host."""
    # Clamped like the decode kernel does, so that a count outside 1..K can never index past the planes.
    levels = slices.clamp(1, num_slices)
    order = torch.argsort(levels, stable=True).to(torch.int32)
    # scatter_add rather than bincount: CUDA bincount reads the maximum back to the host (a sync).
    counts = torch.zeros(num_slices + 1, dtype=torch.int64, device=slices.device)
    counts.scatter_add_(0, levels, torch.ones_like(levels))
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    # Each precision group rounds up to whole tiles: at most num_slices - 1 more tiles than for one group.
    grid = (
        (out_features + PREFILL_BN - 1) // PREFILL_BN,
        (slices.shape[0] + PREFILL_BM - 1) // PREFILL_BM + num_slices - 1,
    )
    return order, offsets, grid


def launch_prefill(
    x: torch.Tensor,
    planes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    slices: torch.Tensor,
    out: torch.Tensor,
    group_size: int,
    gains: torch.Tensor | None = None,
) -> None:
    """Grouped-GEMM kernel: tokens sorted by slice count on the device, no host read-back. Row ``gains``
    (``[K', out]``, K' >= K) are folded into the group parameters as each weight tile is rebuilt."""
    in_features = x.shape[1]
    num_slices, out_features = planes.shape[0] // 2, planes.shape[1]
    # order and offsets may be freed before the queued kernel runs; that is safe because torch's caching
    # allocator hands a freed block only to later work on the same stream.
    order, offsets, grid = prefill_schedule(slices, num_slices, out_features)
    kernels = device_kernels(x.device)
    args = (
        x.data_ptr(), planes.data_ptr(), scale.data_ptr(), zero.data_ptr(), gains_pointer(gains), order.data_ptr(),
        offsets.data_ptr(), out.data_ptr(), out_features, in_features, num_slices, group_size,
    )  # fmt: skip
    types = (_P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I)
    kernels.launch(f"mbq_prefill_{dtype_tag(x.dtype)}", grid, PREFILL_THREADS, PREFILL_SMEM_BYTES, args, types)


def launch_dequant(
    planes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    k: int,
    group_size: int,
    weight: torch.Tensor,
    gains: torch.Tensor | None = None,
) -> None:
    """``weight`` [out, in] (fp16 or bf16, 16-byte aligned) <- W_k from the first 2k planes, with row ``gains``
    (``[K', out]``, K' >= k) folded in when given."""
    out_features, in_features = weight.shape
    words = out_features * (in_features // 32)
    kernels = device_kernels(weight.device)
    grid = (-(-words // DEQUANT_THREADS), 1)
    args = (planes.data_ptr(), scale.data_ptr(), zero.data_ptr(), gains_pointer(gains), weight.data_ptr(),
            out_features, in_features, k, group_size)  # fmt: skip
    types = (_P, _P, _P, _P, _P, _I, _I, _I, _I)
    kernels.launch(f"mbq_dequant_{dtype_tag(weight.dtype)}", grid, DEQUANT_THREADS, 0, args, types)
