"""CUDA kernels for MoBiQuant's elastic linear layer, compiled at run time with NVRTC.

``elastic_linear`` computes ``x[t] @ W_{slices[t]}^T`` from the bit planes of ``mobiquant.slicing``,
reading only the slices each token needs: a CUDA-core decode kernel for up to 16 tokens and a
tensor-core grouped GEMM (tokens sorted by precision) above that. ``compile_kernels`` builds the CUBINs
for a list of architectures without a GPU. ``MOBIQUANT_KERNELS=off`` makes the layer use PyTorch.
"""

from __future__ import annotations

import functools
import os

import torch

from mobiquant.slicing import BITS_PER_SLICE, WORD_BITS, dequantize_codes, unpack_codes

from ._compile import (
    DEFAULT_ARCHS,
    MODULES,
    CompileResult,
    KernelCompileError,
    NvrtcUnavailableError,
    compile_kernels,
    compile_source,
    default_cache_dir,
)

__all__ = [
    "DECODE_MAX_TOKENS",
    "DEFAULT_ARCHS",
    "MAX_SLICES",
    "MODULES",
    "CompileResult",
    "KernelCompileError",
    "NvrtcUnavailableError",
    "compile_kernels",
    "compile_source",
    "default_cache_dir",
    "elastic_linear",
    "enabled",
    "reference_elastic_linear",
]

DECODE_MAX_TOKENS = 16
MAX_SLICES = 4  # MAX_SLICES in common.cuh: codes must fit one byte
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _device_supported(index: int) -> bool:
    """Whether CUDA device ``index`` can run the kernels: cp.async, ldmatrix and bf16 mma need sm_80."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


def enabled() -> bool:
    """False when ``MOBIQUANT_KERNELS`` is ``off``, ``0`` or ``false``: the layer then uses PyTorch."""
    return os.environ.get("MOBIQUANT_KERNELS", "on").lower() not in {"off", "0", "false"}


def reference_elastic_linear(
    x: torch.Tensor,
    planes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    slices: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """PyTorch path: dequantise ``W_k`` for each slice count present, then one matmul per group."""
    del group_size  # implied by the shapes of scale and planes
    out = x.new_empty(x.shape[0], planes.shape[1])
    for k in torch.unique(slices).tolist():
        rows = (slices == k).nonzero(as_tuple=True)[0]
        weight = dequantize_codes(unpack_codes(planes, k), scale, zero, k, x.dtype)
        out[rows] = x[rows] @ weight.T
    return out


def _check_shapes(
    x: torch.Tensor,
    planes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    slices: torch.Tensor,
    group_size: int,
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
    if tuple(slices.shape) != (tokens,):
        raise ValueError(f"slices must be [{tokens}], got {tuple(slices.shape)}")
    for name, tensor in (("planes", planes), ("scale", scale), ("zero", zero)):
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
) -> torch.Tensor:
    """``x[t] @ W_{slices[t]}^T`` for every token: ``x`` [T, in], ``slices`` [T] in 1..K -> [T, out].

    fp16/bf16 CUDA inputs on sm_80 or newer run the kernels; anything else (CPU, fp32, an older GPU,
    more than 4 slices) takes the PyTorch path. Slice counts are not validated here (that would need a
    device-to-host read): the caller checks them, and the kernels clamp them to 1..K so a bad value
    cannot read out of bounds.
    ``out`` (contiguous [T, out], x's dtype, 4-byte aligned) receives the result when given. ``slices`` may
    live on any device: it is moved to ``x``'s; planes, scale and zero must already be there.
    """
    _check_shapes(x, planes, scale, zero, slices, group_size)
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
        result = reference_elastic_linear(x, planes, scale, zero, slices, group_size)
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
    launch = _launch.launch_decode if tokens <= DECODE_MAX_TOKENS else _launch.launch_prefill
    launch(x, *tensors, out, group_size)
    return out
