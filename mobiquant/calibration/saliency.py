"""How much each calibration token's output error at each linear costs the model's loss.

GPTQ and the clip search minimise a linear's output error summed over the calibration tokens, every token
alike: ``H = X^T X``. The model's loss does not weigh tokens alike. Its second-order estimate for a change
``dW`` of one linear is ``1/2 sum_t sum_j (dL/dz_tj)^2 (x_t dW^T)_j^2`` (the empirical Fisher diagonal at
the linear's outputs ``z``, as the allocation uses it). Averaging the squared gradient over output channels
leaves one weight per token, ``s_t = sum_j (dL/dz_tj)^2``, and one Hessian per linear, ``X^T diag(s) X``,
so GPTQ's column loop and the clip search run unchanged on it. This is GuidedQuant's objective (arXiv
2505.07004) with every output channel in one group; it averages the per-channel Fisher blocks within
several groups instead, one Hessian per group.

The gradients come from the full-precision model, one block in memory at a time, walking the blocks
backwards from the loss: block ``i`` runs again on its captured inputs, and the gradient at its outputs is
the gradient that block ``i + 1`` left at its inputs. Each block's saliencies are written beside its
captured inputs; an interrupted walk resumes below the last block it wrote.

An expert's linears see only the tokens routed to the expert. Their saliencies are stored with the positions of
those tokens (:func:`read_token_saliency`), so a later pass whose router breaks a near tie otherwise can still give each
row its own token's weight (:func:`mobiquant.clip_search.input_hessians`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from mobiquant.arch import Architecture, counting_expert_tokens, expert_token_positions
from mobiquant.calibration.store import atomic_save, fp_input_path, holds_capture, load_hidden
from mobiquant.model_files import BlockSource
from mobiquant.streaming import BlockKwargs, block_returns_tuple, head_logits, run_block

GRADIENT_KEY = "input_gradient"
# Beside an expert linear's saliencies, under its name plus this: the positions of its rows' tokens (int64).
POSITIONS_SUFFIX = ":token_positions"


def saliency_path(capture_dir: Path, index: int) -> Path:
    return Path(capture_dir) / f"saliency_{index:04d}.safetensors"


def input_gradient_path(capture_dir: Path, index: int) -> Path:
    """The loss's gradient at block ``index``'s inputs: the next step of the walk starts from it."""
    return Path(capture_dir) / f"saliency_{index:04d}.input-gradient.safetensors"


def block_token_saliency(
    block: torch.nn.Module,
    arch: Architecture,
    inputs: torch.Tensor,
    block_kwargs: dict[str, Any],
    loss_of_outputs: Callable[[int, torch.Tensor], torch.Tensor],
    batch_size: int,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each quantized linear's ``[tokens]`` saliencies ``s_t``, and the loss's gradient at ``inputs``.

    An expert's linear sees only its tokens: its saliencies come with the positions of their tokens among the
    flattened tokens of ``inputs`` (key ``<linear>`` plus :data:`POSITIONS_SUFFIX`).

    ``loss_of_outputs(start, outputs)`` is the loss (or any scalar with the loss's gradient at ``outputs``)
    as a function of the block's outputs for samples ``start:start + len(outputs)``. The block's parameters
    get no gradient.
    """
    device = next(block.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in arch.quantized_linears(block)}
    positions: dict[str, list[torch.Tensor]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
            where = expert_token_positions()

            def on_gradient(grad: torch.Tensor) -> None:
                parts[name].append(grad.detach().float().pow(2).sum(dim=-1).reshape(-1).cpu())
                # Kept with the saliencies they belong to, so both list the same rows in the same order.
                if where is not None:
                    positions.setdefault(name, []).append(where.cpu())

            output.register_hook(on_gradient)

        return hook

    handles = [linear.register_forward_hook(record(name)) for name, linear in arch.quantized_linears(block).items()]
    gradient = torch.empty(inputs.shape, dtype=torch.float32, device="cpu")  # gathered on the host
    try:
        with counting_expert_tokens(block):
            for start in range(0, len(inputs), batch_size):
                chunk = inputs[start : start + batch_size].to(device=device, dtype=torch.float32).requires_grad_(True)
                with torch.enable_grad():
                    loss = loss_of_outputs(start, run_block(block, chunk, block_kwargs))
                    (chunk_gradient,) = torch.autograd.grad(loss, chunk)
                gradient[start : start + len(chunk)] = chunk_gradient.cpu()
    finally:
        for handle in handles:
            handle.remove()
    # An expert's linear that no token reached has no saliency (and, in a block of experts, no position).
    saliency = {name: torch.cat(values) if values else torch.zeros(0) for name, values in parts.items()}
    if arch.experts is not None:
        prefix = f"{arch.experts.path}."
        saliency.update({name + POSITIONS_SUFFIX: torch.cat(positions[name]) if name in positions
                         else torch.zeros(0, dtype=torch.int64) for name in parts if name.startswith(prefix)})
    return saliency, gradient


def capture_token_saliency(
    source: BlockSource,
    samples: torch.Tensor,
    capture_dir: Path,
    block_kwargs: BlockKwargs,
    tag: str,
    *,
    device: torch.device,
    batch_size: int = 4,
    progress: bool = False,
) -> list[str]:
    """Write every block's token saliencies under ``capture_dir`` (its inputs captured there); returns the names.

    ``tag`` marks the files as this capture's; files of another capture are recomputed. The walk starts at
    the last block and resumes below the lowest block already written.
    """
    capture_dir = Path(capture_dir)
    names = [saliency_path(capture_dir, i).name for i in range(source.num_blocks)]
    index = source.num_blocks
    while index > 0 and holds_capture(saliency_path(capture_dir, index - 1), tag):
        index -= 1
    if index == 0:
        return names
    gradient = None
    if index < source.num_blocks:
        if holds_capture(input_gradient_path(capture_dir, index), tag):
            gradient = load_file(str(input_gradient_path(capture_dir, index)))[GRADIENT_KEY]
        else:
            index = source.num_blocks
    # In the source's dtype (the caller's own model, for an in-memory source: never converted here).
    stem = source.stem(device) if gradient is None else None
    returns_tuple: list[bool] = []

    def loss_at_the_head(start: int, outputs: torch.Tensor) -> torch.Tensor:
        # The calibration loss itself: next-token cross entropy summed over every sample's positions.
        loss = outputs.new_zeros(())
        for offset, row in enumerate(samples[start : start + len(outputs)]):
            logits = head_logits(stem, source.arch, row, outputs[offset : offset + 1], returns_tuple[0])
            loss = loss + F.cross_entropy(logits[0, :-1].float(), row[1:].to(logits.device), reduction="sum")
        return loss

    def loss_through_later_blocks(start: int, outputs: torch.Tensor) -> torch.Tensor:
        # Its gradient at ``outputs`` is the gradient the later blocks left at their inputs.
        return (outputs * gradient[start : start + len(outputs)].to(outputs.device)).sum()

    bar = tqdm(total=source.num_blocks, initial=source.num_blocks - index, desc="loss saliency (blocks backwards)",
               unit="block", disable=not progress)
    for block_index in reversed(range(index)):
        block = source.block(block_index, device).float()
        block.requires_grad_(False)
        inputs = load_hidden(fp_input_path(capture_dir, block_index))
        if gradient is None:
            returns_tuple.append(block_returns_tuple(block, inputs[:1].to(device).float(),
                                                     block_kwargs.for_block(block_index)))
        saliency, input_gradient = block_token_saliency(
            block, source.arch, inputs, block_kwargs.for_block(block_index),
            loss_at_the_head if gradient is None else loss_through_later_blocks, batch_size,
        )
        del block
        if block_index > 0:
            # Written before the saliencies, so a block whose saliencies exist always left its gradient.
            atomic_save({GRADIENT_KEY: input_gradient}, input_gradient_path(capture_dir, block_index),
                        {"capture": tag})
        atomic_save(saliency, saliency_path(capture_dir, block_index), {"capture": tag, "block": str(block_index)})
        input_gradient_path(capture_dir, block_index + 1).unlink(missing_ok=True)
        gradient = input_gradient
        bar.update(1)
    bar.close()
    return names


class TokenSaliency(NamedTuple):
    """One block's token weights per linear, and its expert linears' token positions."""

    weights: dict[str, torch.Tensor]
    positions: dict[str, torch.Tensor]


def read_token_saliency(capture_dir: Path, index: int) -> TokenSaliency:
    """Block ``index``'s saliencies scaled to mean 1 per linear (the Hessians' scale stays that of ``X^T X``), and
    its expert linears' token positions, each matching its weights row for row.

    A linear whose outputs never reach the loss (every saliency 0) keeps uniform weights. The positions are empty
    for a dense block, and for files written before they were recorded (their expert linears' rows can then be
    checked by count only).
    """
    weights, positions = {}, {}
    for name, stored in load_file(str(saliency_path(capture_dir, index))).items():
        if name.endswith(POSITIONS_SUFFIX):
            positions[name.removesuffix(POSITIONS_SUFFIX)] = stored
            continue
        mean = stored.double().mean()
        weights[name] = stored.double() / mean if mean > 0 else torch.ones_like(stored, dtype=torch.float64)
    return TokenSaliency(weights, positions)
