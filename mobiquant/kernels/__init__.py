"""CUDA kernels for MoBiQuant's elastic linear layer, compiled at run time with NVRTC.

``elastic_linear`` computes ``x[t] @ W_{slices[t]}^T`` from the bit planes of ``mobiquant.slicing``,
reading only the slices each token needs: a tensor-core decode kernel for up to 16 tokens; above that,
per shape (``prefill_path``), either a tensor-core grouped GEMM (tokens sorted by precision) or, for
each precision group, a fused kernel that dequantises ``W_k`` to fp16/bf16 followed by cuBLAS.
``compile_kernels`` builds the CUBINs for a list of architectures without a GPU.
``MOBIQUANT_KERNELS=off`` makes the layer use PyTorch, as does a missing cuda-python (the ``cuda`` extra)
unless ``MOBIQUANT_KERNELS`` asks for the kernels explicitly.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable

import torch

from mobiquant.slicing import BITS_PER_SLICE, WORD_BITS, dequantize_codes, unpack_codes

from ._compile import (
    DEFAULT_ARCHS,
    MODULES,
    CompileResult,
    KernelCompileError,
    NvrtcUnavailableError,
    UnsupportedArchError,
    compile_kernels,
    compile_source,
    default_cache_dir,
)

__all__ = [
    "DECODE_MAX_TOKENS",
    "DEFAULT_ARCHS",
    "MAX_SLICES",
    "MODULES",
    "PREFILL_DEQUANT_MIN_TOKENS",
    "CompileResult",
    "CudaPythonMissingError",
    "KernelCompileError",
    "NvrtcUnavailableError",
    "UnsupportedArchError",
    "compile_kernels",
    "compile_source",
    "default_cache_dir",
    "dequant_matmul",
    "elastic_linear",
    "enabled",
    "prefill_path",
    "reference_elastic_linear",
]

DECODE_MAX_TOKENS = 16
# From this many tokens on, prefill dequantises W_k and calls cuBLAS: writing and re-reading W_k costs
# about what a cuBLAS product of ~1000 tokens costs on an H100, so below that the grouped GEMM (which
# reads only the planes) is expected to win. A lead from arithmetic, not yet measured on a GPU.
PREFILL_DEQUANT_MIN_TOKENS = 1024
PREFILL_PATHS = ("grouped", "dequant")
PREFILL_ENV = "MOBIQUANT_PREFILL"
MAX_SLICES = 4  # MAX_SLICES in common.cuh: codes must fit one byte
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _device_supported(index: int) -> bool:
    """Whether CUDA device ``index`` can run the kernels: cp.async, ldmatrix and bf16 mma need sm_80."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


KERNELS_ENV = "MOBIQUANT_KERNELS"
CUDA_EXTRA_HINT = "pip install '.[cuda]'"
CUDA_PYTHON_MODULES = ("cuda.bindings.driver", "cuda.bindings.nvrtc")


class CudaPythonMissingError(ImportError):
    """The kernels were asked for (``MOBIQUANT_KERNELS`` set) but cuda-python is not installed."""


@functools.cache  # asked at every forward of every layer: look once per process
def cuda_python_available() -> bool:
    """Whether cuda-python's driver and NVRTC bindings can be imported (the ``cuda`` extra)."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in CUDA_PYTHON_MODULES)
    except (ImportError, ValueError):  # a parent package missing, or blocked in sys.modules
        return False


@functools.cache
def _warn_no_cuda_python() -> None:
    warnings.warn(
        f"cuda-python is not installed: the CUDA kernels are off and the layer uses PyTorch; {CUDA_EXTRA_HINT}",
        RuntimeWarning,
        stacklevel=3,
    )


def enabled() -> bool:
    """False when ``MOBIQUANT_KERNELS`` is ``off``, ``0`` or ``false``: the layer then uses PyTorch.

    Without cuda-python the default (unset) falls back to PyTorch with a one-time warning; any other explicit
    value (``on``, ``1``, ...) raises ``CudaPythonMissingError`` naming the ``cuda`` extra.
    """
    setting = os.environ.get(KERNELS_ENV, "").strip().lower()
    if setting in {"off", "0", "false"}:
        return False
    if not cuda_python_available():
        if setting not in {"", "auto"}:
            raise CudaPythonMissingError(
                f"{KERNELS_ENV}={setting} asks for the CUDA kernels but cuda-python is not installed: {CUDA_EXTRA_HINT}"
            )
        _warn_no_cuda_python()
        return False
    return True


def prefill_path(tokens: int) -> str:
    """``"dequant"`` (W_k then cuBLAS) or ``"grouped"`` (the grouped-GEMM kernel) for a batch of ``tokens``;
    ``MOBIQUANT_PREFILL=grouped|dequant`` forces one (the kernel bench times both)."""
    forced = os.environ.get(PREFILL_ENV, "auto").lower()
    if forced in PREFILL_PATHS:
        return forced
    if forced != "auto":
        raise ValueError(f"{PREFILL_ENV} must be one of auto, {', '.join(PREFILL_PATHS)}; got {forced!r}")
    return "dequant" if tokens >= PREFILL_DEQUANT_MIN_TOKENS else "grouped"


def dequant_matmul(
    x: torch.Tensor,
    slices: torch.Tensor,
    num_slices: int,
    dequantise: Callable[[int], torch.Tensor],
    out: torch.Tensor,
    uniform: int | None = None,
) -> torch.Tensor:
    """``out[t] = x[t] @ W_{k_t}^T`` with one dense product per slice count present, ``dequantise(k)``
    giving ``W_k`` [out, in] in x's dtype. Reads the slice counts present back to the host (one sync), unless
    ``uniform`` gives the count of every token.
    """
    if uniform is not None:  # the read waits for the device: a large share of a prefill product (docs/gpu.md)
        return torch.matmul(x, dequantise(min(max(uniform, 1), num_slices)).T, out=out)
    levels = slices.clamp(1, num_slices)
    tokens_at = torch.bincount(levels, minlength=num_slices + 1).tolist()  # the one read-back
    present = [k for k in range(1, num_slices + 1) if tokens_at[k]]
    if not present:
        return out
    if len(present) == 1:
        return torch.matmul(x, dequantise(present[0]).T, out=out)
    # Tokens sorted by slice count make each precision group one contiguous run: one gather, one product per
    # group, one scatter back, and no further read of the device (a row list per group would be one each).
    order = torch.argsort(levels, stable=True)
    groups = x.index_select(0, order).split([tokens_at[k] for k in present])
    products = torch.cat([rows @ dequantise(k).T for k, rows in zip(present, groups, strict=True)])
    return out.index_copy_(0, order, products)


def reference_elastic_linear(
    x: torch.Tensor,
    planes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    slices: torch.Tensor,
    group_size: int,
    gains: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch path: dequantise ``W_k`` for each slice count present, then one matmul per group."""
    del group_size  # implied by the shapes of scale and planes
    out = x.new_empty(x.shape[0], planes.shape[1])
    for k in torch.unique(slices).tolist():
        rows = (slices == k).nonzero(as_tuple=True)[0]
        gain = None if gains is None else gains[k - 1]
        weight = dequantize_codes(unpack_codes(planes, k), scale, zero, k, x.dtype, gain)
        out[rows] = x[rows] @ weight.T
    return out


def _check_shapes(
    x: torch.Tensor,
    planes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    slices: torch.Tensor,
    group_size: int,
    gains: torch.Tensor | None,
) -> None:
    if x.dim() != 2 or planes.dim() != 3 or planes.shape[0] % BITS_PER_SLICE:
        raise ValueError(f"expected x [T, in] and planes [2K, out, in/32], got {tuple(x.shape)}, {tuple(planes.shape)}")
    tokens, in_features = x.shape
    out_features = planes.shape[1]
    if planes.shape[2] * WORD_BITS != in_features or planes.dtype != torch.int32:
        raise ValueError(f"planes {tuple(planes.shape)} {planes.dtype} do not match {in_features} input features")
    if group_size <= 0 or group_size % WORD_BITS or in_features % group_size:
        raise ValueError(f"group_size {group_size} must be a multiple of 32 dividing {in_features}")
    groups = (out_features, in_features // group_size)
    if tuple(scale.shape) != groups or tuple(zero.shape) != groups:
        raise ValueError(f"scale/zero must be {groups}, got {tuple(scale.shape)} and {tuple(zero.shape)}")
    if scale.dtype != torch.float16 or zero.dtype != torch.float16:
        raise ValueError("scale and zero must be float16 (the packed format)")
    if gains is not None and gains.dtype != torch.float16:
        raise ValueError(f"gains must be float16 (the packed format), got {gains.dtype}")
    if tuple(slices.shape) != (tokens,):
        raise ValueError(f"slices must be [{tokens}], got {tuple(slices.shape)}")
    if gains is not None and (gains.dim() != 2 or gains.shape[0] < planes.shape[0] // BITS_PER_SLICE
                              or gains.shape[1] != out_features):
        raise ValueError(f"gains must be [K, {out_features}] with a row per slice held, got {tuple(gains.shape)}")
    named = (("planes", planes), ("scale", scale), ("zero", zero)) + (() if gains is None else (("gains", gains),))
    for name, tensor in named:
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}: move the layer to x's device")


def _check_out(out: torch.Tensor, x: torch.Tensor, shape: tuple[int, int]) -> None:
    if tuple(out.shape) != shape or out.dtype != x.dtype or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {shape} on {x.device}")
    # The kernels store pairs of 16-bit outputs as one 32-bit word.
    if out.data_ptr() % 4:
        raise ValueError(f"out must start on a 4-byte boundary, got address {out.data_ptr():#x}")


def elastic_linear(
    x: torch.Tensor,
    planes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    slices: torch.Tensor,
    group_size: int,
    out: torch.Tensor | None = None,
    gains: torch.Tensor | None = None,
    uniform: int | None = None,
) -> torch.Tensor:
    """``x[t] @ W_{slices[t]}^T`` for every token: ``x`` [T, in], ``slices`` [T] in 1..K -> [T, out].

    fp16/bf16 CUDA inputs on sm_80 or newer run the kernels; anything else (CPU, fp32, an older GPU,
    more than 4 slices) takes the PyTorch path. Slice counts are not validated here (that would need a
    device-to-host read): the caller checks them, and both paths clamp them to 1..K so a bad value
    cannot read out of bounds and a token gets the same slices on every device.
    ``out`` (contiguous [T, out], x's dtype, 4-byte aligned) receives the result when given. ``slices`` may
    live on any device: it is moved to ``x``'s; planes, scale and zero must already be there. Row ``gains``
    (float16 ``[K, out]``, format v2) are folded into the group parameters by every kernel, so a gained
    weight costs no pass of its own. ``uniform``, where the caller knows on the host that every count in ``slices``
    is that number: the prefill path then reads nothing back from the device.
    """
    _check_shapes(x, planes, scale, zero, slices, group_size, gains)
    shape = (x.shape[0], planes.shape[1])
    if out is not None:
        _check_out(out, x, shape)
    # A host tensor of counts read by the kernel would be an illegal address (a sticky error for the process).
    slices = slices.to(device=x.device, dtype=torch.int64).contiguous()
    num_slices = planes.shape[0] // BITS_PER_SLICE
    if (
        not x.is_cuda
        or x.dtype not in KERNEL_DTYPES
        or num_slices > MAX_SLICES
        or not _device_supported(x.device.index)
    ):
        clamped = slices.clamp(1, num_slices)
        result = reference_elastic_linear(x, planes, scale, zero, clamped, group_size, gains)
        return result if out is None else out.copy_(result)

    from . import _launch

    tokens = x.shape[0]
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    x = x.contiguous()
    if x.data_ptr() % 16:  # the kernels read x rows with 16-byte vector loads
        x = x.clone()
    tensors = (planes.contiguous(), scale.contiguous(), zero.contiguous(), slices)
    if tokens <= DECODE_MAX_TOKENS:
        # The decode layout folds the gains into its group parameters: nothing to apply afterwards. The
        # tensor itself is passed (not a slice of it): the layout is cached by the tensors' identities.
        _launch.launch_decode(x, *tensors, out, group_size, gains)
        return out
    gains = None if gains is None else gains.contiguous()
    if prefill_path(tokens) == "grouped":
        _launch.launch_prefill(x, *tensors, out, group_size, gains)
    else:
        planes, scale, zero = tensors[:3]

        def dequantise(k: int) -> torch.Tensor:
            weight = torch.empty(planes.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
            _launch.launch_dequant(planes, scale, zero, k, group_size, weight, gains)
            return weight

        dequant_matmul(x, slices, num_slices, dequantise, out, uniform)
    return out
