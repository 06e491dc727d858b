"""Perplexity as GPTQ and OmniQuant measure it, and the round-to-nearest (RTN) baseline."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mobiquant.arch import Architecture
from mobiquant.model_files import BlockSource
from mobiquant.streaming import block_returns_tuple, first_block_inputs, logits_from_last_hidden, run_block


class EvaluationError(ValueError):
    """Evaluation inputs that cannot give a perplexity (too few tokens, bad window length)."""


def model_context(model: nn.Module) -> int | None:
    """The longest sequence the model's position embeddings cover, if its config says."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def evaluation_windows(
    tokens: torch.Tensor, seqlen: int, context: int | None = None, max_windows: int | None = None
) -> torch.Tensor:
    """``[windows, seqlen]``: non-overlapping windows of ``tokens`` (``[1, N]`` or ``[N]``), per docs/method.md.

    The window is ``seqlen`` or the model's ``context``, if shorter; a trailing partial window is dropped and
    ``max_windows`` keeps only the first windows.
    """
    if not (tokens.dim() == 1 or (tokens.dim() == 2 and tokens.shape[0] == 1)):
        raise EvaluationError(f"expected tokens of shape [1, N] or [N], got {tuple(tokens.shape)}")
    flat = tokens.reshape(-1)
    if context is not None:
        seqlen = min(seqlen, context)
    if seqlen < 2:
        raise EvaluationError(f"window length must be at least 2 tokens, got {seqlen}")
    windows = flat.numel() // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise EvaluationError(f"max_windows must be at least 1, got {max_windows}")
        windows = min(windows, max_windows)
    if windows == 0:
        raise EvaluationError(f"{flat.numel()} tokens are fewer than one window of {seqlen}")
    return flat[: windows * seqlen].reshape(windows, seqlen)


def window_nll(logits: torch.Tensor, window: torch.Tensor) -> float:
    """Summed negative log-likelihood of tokens 2..n of ``window`` (``[1, n]``) under ``logits`` (``[1, n, V]``)."""
    # Float32 log-softmax at least: half-precision logits lose the tail of the distribution.
    log_probs = F.log_softmax(logits[0, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return float(-log_probs.gather(-1, window[0, 1:].unsqueeze(-1).to(log_probs.device)).sum())


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """Perplexity of ``model`` on ``tokens`` (``[1, N]`` or ``[N]``), the protocol of docs/method.md.

    The tokens are cut into non-overlapping windows of ``seqlen`` (or the model's context, if
    shorter); a trailing partial window is dropped. Each window is scored on its own, predicting
    tokens 2..seqlen from the ones before; the result is ``exp`` of the mean token negative
    log-likelihood over all windows (``max_windows`` keeps only the first windows).
    """
    windows = evaluation_windows(tokens, seqlen, model_context(model), max_windows)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total_nll = 0.0
    counted = 0
    try:
        for row in tqdm(windows, desc=desc, unit="window", disable=not progress):
            window = row.to(device).unsqueeze(0)
            total_nll += window_nll(model(input_ids=window, use_cache=False).logits, window)
            counted += window.shape[1] - 1
    finally:
        model.train(was_training)
    return math.exp(total_nll / counted)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """``weight`` after asymmetric min-max round-to-nearest, the standard RTN baseline.

    Per output row and group of ``group_size`` input columns (the whole row if ``None``):
    ``scale = (max - min) / (2^bits - 1)``, an integer zero point ``zero = round(-min / scale)``,
    ``q = clamp(round(w / scale) + zero, 0, 2^bits - 1)`` and the weight ``(q - zero) * scale``.
    Computed in float32 (float64 for a float64 weight) and returned in the weight's dtype.
    """
    if weight.dim() != 2:
        raise EvaluationError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if not 1 <= bits <= 16:
        raise EvaluationError(f"bits must be in 1..16, got {bits}")
    out_features, in_features = weight.shape
    group = in_features if group_size is None else group_size
    if group < 1 or in_features % group:
        raise EvaluationError(f"group size {group_size} does not divide the input size {in_features}")
    work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    grouped = weight.detach().to(work_dtype).reshape(out_features, in_features // group, group)
    w_min = grouped.amin(dim=-1, keepdim=True)
    w_max = grouped.amax(dim=-1, keepdim=True)
    levels = 2**bits - 1
    # A group of equal values has range zero: a scale far below its magnitude (a power of two times
    # it) still reproduces the value exactly, and the smallest normal number covers all-zero groups.
    floor = torch.clamp(torch.maximum(w_max.abs(), w_min.abs()) * 2.0**-16, min=torch.finfo(work_dtype).tiny)
    scale = torch.maximum((w_max - w_min) / levels, floor)
    zero = torch.round(-w_min / scale)
    q = torch.clamp(torch.round(grouped / scale) + zero, 0, levels)
    return ((q - zero) * scale).reshape(out_features, in_features).to(weight.dtype)


@torch.no_grad()
def rtn_model(model: nn.Module, arch: Architecture, bits: int, group_size: int | None = 128) -> nn.Module:
    """A copy of ``model`` whose quantized linears (per ``arch``) carry RTN weights; ``model`` is untouched."""
    quantized = arch.linearize(copy.deepcopy(model))
    for block in arch.block_list(quantized):
        for name, linear in arch.quantized_linears(block).items():
            if not isinstance(linear, nn.Linear):
                raise EvaluationError(
                    f"{name} is a {type(linear).__name__}, not an nn.Linear: RTN needs the dense model"
                )
            linear.weight.copy_(rtn_quantize(linear.weight, bits, group_size))
    return quantized


BlockTransform = Callable[[nn.Module], None]


@torch.no_grad()
def streamed_perplexities(
    source: BlockSource,
    tokens: torch.Tensor,
    variants: Mapping[str, BlockTransform | None],
    device: torch.device,
    seqlen: int = 2048,
    max_windows: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Perplexity of the source model under each variant, one block in memory at a time (GPTQ's eval loop).

    A variant is ``None`` (the model as it is) or a function changing a float32 block in place (RTN of its
    linears, say); all variants share one pass over the blocks. Same windows and sums as :func:`perplexity`.
    """
    windows = evaluation_windows(tokens, seqlen, getattr(source.config, "max_position_embeddings", None),
                                 max_windows)
    stem = source.stem(device)
    hidden, all_kwargs = first_block_inputs(stem, source.arch, windows, dtype=source.source_dtype)
    all_kwargs = all_kwargs.float()
    states = {name: hidden for name in variants}
    returns_tuple = False
    for index in tqdm(range(source.num_blocks), desc="perplexity (streamed blocks)", unit="block",
                      disable=not progress):
        block = source.block(index, device)
        block_kwargs = all_kwargs.for_block(index)
        if index == 0:
            # Every block is of one class: what the first returns, the last returns.
            returns_tuple = block_returns_tuple(block, hidden[:1].float(), block_kwargs)
        for name, transform in variants.items():
            variant = block
            if transform is not None:
                variant = copy.deepcopy(block)
                transform(variant)
            out = torch.empty_like(states[name])
            for row in range(len(windows)):
                out[row : row + 1] = run_block(variant, states[name][row : row + 1].float(), block_kwargs)
            states[name] = out
        del block
    result = {}
    for name in variants:
        total = 0.0
        for row, window in enumerate(windows):
            logits = logits_from_last_hidden(stem, source.arch, window, states[name][row : row + 1], returns_tuple)
            total += window_nll(logits, window.unsqueeze(0))
        result[name] = math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))
    return result


def rtn_transform(arch: Architecture, bits: int, group_size: int | None) -> BlockTransform:
    """A block transform replacing the weights of ``arch``'s quantized linears by their RTN values."""

    def apply(block: nn.Module) -> None:
        for linear in arch.quantized_linears(block).values():
            linear.weight.copy_(rtn_quantize(linear.weight, bits, group_size))

    return apply
