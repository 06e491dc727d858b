"""Running a causal LM one block at a time: the inputs of its first block, and logits from its last outputs.

Both work on a *stem* (the model whose blocks may be empty, see :mod:`mobiquant.model_files`) through the
model's own ``forward``, so no family needs code of its own: for the first block's inputs, block 0's
``forward`` is replaced by one that records its arguments and stops the pass; for the logits, every block
passes its input through and the last returns the stored hidden states, so the model's own final norm and
head run on them (as GPTQ's evaluation loop does by hand for one family).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from mobiquant.arch import Architecture


class _StopForward(Exception):
    """Raised once block 0's inputs are recorded: nothing after it needs to run."""


@contextlib.contextmanager
def _replaced_forward(module: nn.Module, forward: Callable[..., Any]) -> Iterator[None]:
    module.forward = forward
    try:
        yield
    finally:
        del module.forward


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def first_block_inputs(
    stem: nn.Module, arch: Architecture, rows: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Hidden states entering block 0 for every row of ``rows`` (``[n, seqlen]``), and its other arguments.

    Rows run one at a time, so the recorded keyword arguments (causal mask, rotary embeddings) are those of a
    batch of one; they broadcast over any batch of the same length. ``dtype`` is the dtype the hidden states
    are kept in (default: as the embeddings give them).
    """
    first = arch.block_list(stem)[0]
    hidden: list[torch.Tensor] = []
    block_kwargs: dict[str, Any] = {}

    def record(*args: Any, **kwargs: Any) -> None:
        state = args[0] if args else kwargs["hidden_states"]
        hidden.append(state.detach().to(dtype or state.dtype))
        if not block_kwargs:
            block_kwargs.update({k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")})
            block_kwargs["use_cache"] = False
        raise _StopForward

    device = _device_of(stem)
    with _replaced_forward(first, record):
        for row in rows:
            with contextlib.suppress(_StopForward):
                stem(row.unsqueeze(0).to(device), use_cache=False)
    return torch.cat(hidden), block_kwargs


def run_block(block: nn.Module, hidden: torch.Tensor, block_kwargs: dict[str, Any]) -> torch.Tensor:
    """A block's output hidden states, whether the block returns a tensor or a tuple."""
    out = block(hidden, **block_kwargs)
    return out[0] if isinstance(out, tuple) else out


def block_returns_tuple(block: nn.Module, hidden: torch.Tensor, block_kwargs: dict[str, Any]) -> bool:
    with torch.no_grad():
        return isinstance(block(hidden[:1], **block_kwargs), tuple)


@torch.no_grad()
def logits_from_last_hidden(
    stem: nn.Module, arch: Architecture, row: torch.Tensor, last_hidden: torch.Tensor, returns_tuple: bool
) -> torch.Tensor:
    """The model's logits for ``row`` (``[seqlen]``) given the last block's output ``last_hidden``."""
    return head_logits(stem, arch, row, last_hidden, returns_tuple)


def head_logits(
    stem: nn.Module, arch: Architecture, row: torch.Tensor, last_hidden: torch.Tensor, returns_tuple: bool
) -> torch.Tensor:
    """:func:`logits_from_last_hidden` differentiable in ``last_hidden`` (the model's final norm and head)."""
    blocks = arch.block_list(stem)
    dtype = next(p.dtype for p in stem.parameters() if p.device.type != "meta")

    def passthrough(hidden_states: torch.Tensor, *_args: Any, **_kwargs: Any) -> Any:
        return (hidden_states,) if returns_tuple else hidden_states

    def last(*_args: Any, **_kwargs: Any) -> Any:
        out = last_hidden.to(dtype)
        return (out,) if returns_tuple else out

    with contextlib.ExitStack() as stack:
        for block in blocks[:-1]:
            stack.enter_context(_replaced_forward(block, passthrough))
        stack.enter_context(_replaced_forward(blocks[-1], last))
        return stem(row.unsqueeze(0).to(_device_of(stem)), use_cache=False).logits
