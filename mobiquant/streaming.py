"""Running a causal LM one block at a time: the inputs of its blocks, and logits from its last outputs.

Both work on a *stem* (the model whose blocks may be empty, see :mod:`mobiquant.model_files`) through the
model's own ``forward``, so no family needs code of its own: for the blocks' inputs, every block's
``forward`` is replaced by one that records its arguments and passes its input on; for the logits, every block
passes its input through and the last returns the stored hidden states, so the model's own final norm and
head run on them (as GPTQ's evaluation loop does by hand for one family).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mobiquant.arch import Architecture


class _StopForward(Exception):
    """Raised once the blocks' inputs are recorded: nothing after them needs to run."""


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


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, tuple | list):
        return tuple(_float32(v) for v in value)
    return value


@dataclass(frozen=True)
class BlockKwargs:
    """The keyword arguments the model passes to each of its blocks, each distinct set stored once.

    Families differ per block: a sliding-window layer gets its own attention mask (Qwen2/3, Gemma 2/3, ...),
    a Gemma 3 local layer its own rotary embeddings; so every block runs with its own set, never block 0's.
    """

    sets: tuple[dict[str, Any], ...]
    set_of_block: tuple[int, ...]
    """Block index -> index in ``sets``."""

    @classmethod
    def grouped(cls, per_block: list[dict[str, Any]]) -> BlockKwargs:
        """Blocks with identical arguments (tensors compared by value) share one set."""
        sets: list[dict[str, Any]] = []
        set_of_block = []
        for kwargs in per_block:
            found = next((i for i, s in enumerate(sets) if s.keys() == kwargs.keys()
                          and all(_same(s[k], kwargs[k]) for k in s)), None)
            if found is None:
                sets.append(kwargs)
                found = len(sets) - 1
            set_of_block.append(found)
        return cls(tuple(sets), tuple(set_of_block))

    def for_block(self, index: int) -> dict[str, Any]:
        return self.sets[self.set_of_block[index]]

    def float(self) -> BlockKwargs:
        """Floating-point tensors in float32 (the blocks compute in float32)."""
        return BlockKwargs(tuple({k: _float32(v) for k, v in s.items()} for s in self.sets), self.set_of_block)


@torch.no_grad()
def first_block_inputs(
    stem: nn.Module, arch: Architecture, rows: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, BlockKwargs]:
    """Hidden states entering block 0 for every row of ``rows`` (``[n, seqlen]``), and every block's other arguments.

    Every block's ``forward`` is replaced by one that records its arguments and passes its input through (the
    blocks' weights are never used, so they may be on the meta device); the last block stops the pass, so the
    final norm and head never run. After the first row only block 0's input is recorded. Rows run one at a
    time, so the recorded keyword arguments (causal masks, rotary embeddings) are those of a batch of one; they
    broadcast over any batch of the same length. ``dtype`` is the dtype the hidden states are kept in
    (default: as the embeddings give them).
    """
    blocks = arch.block_list(stem)
    hidden: list[torch.Tensor] = []
    per_block: list[dict[str, Any]] = []

    def recorder(index: int) -> Callable[..., torch.Tensor]:
        def record(*args: Any, **kwargs: Any) -> torch.Tensor:
            state = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                hidden.append(state.detach().to(dtype or state.dtype))
            if index == len(per_block):
                # The KV cache (``cache`` since transformers 5.24, ``past_key_values`` before) is never replayed.
                kept = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "cache")}
                per_block.append({**kept, "use_cache": False})
            if len(per_block) == len(blocks):
                raise _StopForward
            return state

        return record

    device = _device_of(stem)
    with contextlib.ExitStack() as stack:
        for index, block in enumerate(blocks):
            stack.enter_context(_replaced_forward(block, recorder(index)))
        for row in rows:
            with contextlib.suppress(_StopForward):
                stem(row.unsqueeze(0).to(device), use_cache=False)
    return torch.cat(hidden), BlockKwargs.grouped(per_block)


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
    device = _device_of(stem)

    def passthrough(hidden_states: torch.Tensor, *_args: Any, **_kwargs: Any) -> Any:
        return (hidden_states,) if returns_tuple else hidden_states

    def last(*_args: Any, **_kwargs: Any) -> Any:
        # The teacher's last hidden states come from the host (block_outputs keeps them beside its inputs).
        out = last_hidden.to(device=device, dtype=dtype)
        return (out,) if returns_tuple else out

    with contextlib.ExitStack() as stack:
        for block in blocks[:-1]:
            stack.enter_context(_replaced_forward(block, passthrough))
        stack.enter_context(_replaced_forward(blocks[-1], last))
        return stem(row.unsqueeze(0).to(device), use_cache=False).logits
