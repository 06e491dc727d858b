"""Block-by-block calibration (OmniQuant-style) of MoBiSlice clipping and MoBiRoute routers.

For each transformer block:

* stage 1 fits learnable weight clipping (LWC) so that the block computed with slice 1 alone matches
  the full-precision block output;
* with the clipping final, error-compensated codes (GPTQ over a weighted sum of the precisions' output
  errors, ``mobiquant.gptq``) replace the floor codes and are what the checkpoint stores;
* between the stages each router is fitted to rank its tokens by the output error they keep at each
  slice count (``fit_routers_to_errors``), so stage 2 starts from routers that already know which
  tokens need more slices;
* stage 2 trains clipping and routers jointly (only the routers once the codes are compensated): the
  block under routed slices against the full-precision output, plus a budget term pulling the average
  bits toward a target sampled anew at every step, so one router serves the whole range of budgets.

A single-precision *control* (``target_bits`` set) trains the same clipping for one slice count, with
no router: the baseline that MoBiQuant's one checkpoint is compared against.

Blocks are independent units of work in ``parallel`` mode (every block trains on full-precision inputs
captured once); in ``sequential`` mode block ``i`` trains on the outputs of the already-quantized blocks
before it. Each finished block is saved, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mobiquant.arch import Architecture, counting_expert_tokens, summarize_linears
from mobiquant.calibration.config import ROUTER_FIT_TOKENS, CalibrationConfig
from mobiquant.calibration.routers import fit_routers
from mobiquant.calibration.trainable import TrainableSlicedLinear, fix_codes
from mobiquant.clip_search import input_hessians
from mobiquant.gptq import shared_passes
from mobiquant.layers import MoBiLinear

ProgressCallback = Callable[[dict[str, Any]], None]
log = logging.getLogger(__name__)


def _report(on_progress: ProgressCallback | None, block_index: int, stage: str) -> None:
    if on_progress is not None:
        on_progress({"block": block_index, "stage": stage})


def compute_precision(config: CalibrationConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The block's matrix products in ``config.compute_dtype``: float32, TF32 or bf16 autocast (CUDA only).

    Trainable parameters (clipping logits, routers) stay float32 whatever is chosen: only the precision of
    the block's matrix products changes.
    """
    if config.compute_dtype == "float32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise ValueError(f"compute_dtype {config.compute_dtype!r} needs a CUDA device; use float32 on the CPU")
    if config.compute_dtype == "bfloat16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return _tf32_matmuls()


@contextlib.contextmanager
def _tf32_matmuls() -> Iterator[None]:
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def run_block(block: nn.Module, hidden: torch.Tensor, block_kwargs: dict[str, Any]) -> torch.Tensor:
    """A block's output hidden states, whether the block returns a tensor or a tuple."""
    out = block(hidden, **block_kwargs)
    return out[0] if isinstance(out, tuple) else out


def _swap(block: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, child, module)


def _batched_outputs(block: nn.Module, inputs: torch.Tensor, block_kwargs: dict[str, Any], batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([run_block(block, inputs[i : i + batch], block_kwargs) for i in range(0, len(inputs), batch)])


def _outputs_and_unreached(block: nn.Module, inputs: torch.Tensor, block_kwargs: dict[str, Any], batch: int,
                           linears: Mapping[str, nn.Module]) -> tuple[torch.Tensor, list[str]]:
    """The block's outputs on ``inputs``, and which of ``linears`` no input row reached."""
    reached: set[str] = set()

    def note(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            if args[0].numel():
                reached.add(name)

        return hook

    handles = [linear.register_forward_pre_hook(note(name)) for name, linear in linears.items()]
    try:
        outputs = _batched_outputs(block, inputs, block_kwargs, batch)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, [name for name in linears if name not in reached]


@dataclass
class BlockResult:
    state: dict[str, torch.Tensor]
    """MoBiLinear state of every quantized linear, keyed ``<linear>.<tensor>`` inside the block."""
    losses: dict[str, list[float]]
    seconds: float
    unreached: tuple[str, ...] = ()
    """The linears no calibration token reached (experts not routed to), calibrated from their weights alone."""


def calibrate_block(
    block: nn.Module,
    inputs: torch.Tensor,
    block_kwargs: dict[str, Any],
    arch: Architecture,
    config: CalibrationConfig,
    targets: torch.Tensor | None = None,
    block_index: int = 0,
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
    token_weights: Mapping[str, torch.Tensor] | None = None,
    token_positions: Mapping[str, torch.Tensor] | None = None,
) -> BlockResult:
    """Calibrate one block; ``targets`` default to the full-precision block's outputs on ``inputs``.

    ``token_weights`` (per linear, one per input token) weigh the tokens in the Hessians of the clip search,
    the codes and the row gains (:mod:`mobiquant.calibration.saliency`); ``token_positions`` (per expert linear,
    its weights' tokens) give an expert's rows their own tokens' weights where the router breaks a near tie otherwise
    than when they were measured. The block's own linears are left untouched; the result holds the quantized state.
    """
    started = time.perf_counter()
    seed = config.seed * 100_003 + block_index
    generator = torch.Generator().manual_seed(seed)
    # The routers' initial weights come from a generator of their own, not torch's global one, which blocks
    # calibrated in threads of one process share.
    router_generator = torch.Generator().manual_seed(seed)
    block = block.float()
    device = next(block.parameters()).device
    inputs = inputs.to(device=device, dtype=torch.float32)
    if targets is not None:
        targets = targets.to(device=device, dtype=torch.float32)
    originals = arch.quantized_linears(block)
    # An expert's linears see only the tokens routed to the expert, possibly none.
    experts = f"{arch.experts.path}." if arch.experts is not None else None
    optional = [name for name in originals if experts is not None and name.startswith(experts)]
    if token_weights is not None and optional and config.mode == "sequential":
        # The saliencies follow the full-precision model's routing; here the quantized blocks' outputs are
        # routed, so an expert's rows are other tokens: its tokens weigh alike.
        token_weights = {name: weights for name, weights in token_weights.items() if name not in optional}
    hessians: dict[str, torch.Tensor] = {}
    unreached: list[str] = []
    with compute_precision(config, device):
        if config.clip_search or config.error_compensation:
            # One pass of the unquantized block gives the clip search and GPTQ their inputs' X^T X (in
            # sequential mode the quantized blocks' outputs) and, in parallel mode, the targets. The experts' tokens
            # are numbered as in the saliency pass, to match their rows to the saliencies by token.
            with counting_expert_tokens(block):
                hessians, outputs = input_hessians(
                    originals, lambda: _batched_outputs(block, inputs, block_kwargs, config.batch_size),
                    token_weights, optional, token_positions,
                )
            targets = outputs.float() if targets is None else targets
            unreached = [name for name in originals if not bool(hessians[name].any())]
        elif targets is None or optional:
            # No Hessians to tell which experts no token reached: this pass tells it (and gives the targets).
            outputs, unreached = _outputs_and_unreached(block, inputs, block_kwargs, config.batch_size,
                                                        {name: originals[name] for name in optional})
            targets = outputs.float() if targets is None else targets
    if unreached:
        # No token was routed to these experts: no output error to weigh. The identity Hessian makes the clip
        # search, the codes and the row gains minimise the weight error itself (the codes are then the nearest
        # codes of the clipped grid, with nothing to compensate).
        how = ("their clipping, codes and gains minimise the weight error (identity Hessian)" if hessians
               else "their codes come from their weights alone")
        log.warning("block %d: no calibration token reached %s; %s, their routers are constant",
                    block_index, ", ".join(summarize_linears(unreached)), how)
        for name in unreached:
            if name in hessians:
                hessians[name] = torch.eye(len(hessians[name]), dtype=hessians[name].dtype,
                                           device=hessians[name].device)
    trainables = {name: TrainableSlicedLinear(linear, config, router_generator) for name, linear in originals.items()}
    if config.clip_search:
        # The clip search is most of a block's time before LWC: it gets a bar of its own.
        for name, module in tqdm(trainables.items(), desc=f"block {block_index} clip search", unit="linear",
                                 disable=not progress, leave=False):
            module.start_clipping_from_search(hessians[name], config.clip_objective(name))
        _report(on_progress, block_index, "clip search")
    for param in block.parameters():
        param.requires_grad_(False)
    for name, module in trainables.items():
        _swap(block, name, module)
    layer_params = {name: float(m.weight.numel()) for name, m in trainables.items()}
    losses: dict[str, list[float]] = {"stage1": [], "stage2": []}
    try:
        _train_stage(
            block, trainables, inputs, targets, block_kwargs, config, "stage1", losses, generator,
            layer_params, block_index, progress, on_progress,
        )
        if config.error_compensation:
            names = list(trainables)
            objectives = {name: config.compensation_objective(name) for name in names}
            # The linears reading one input share a pass of the column loop, whose cost is its steps per column.
            passes = shared_passes([tuple(trainables[name].weight.shape) for name in names],
                                   [objectives[name] for name in names])
            errors: dict[str, dict[int, float]] = {}
            with tqdm(total=len(names), desc=f"block {block_index} GPTQ codes", unit="linear", disable=not progress,
                      leave=False) as bar:
                for indices in passes:
                    together = [names[i] for i in indices]
                    errors.update(zip(together, fix_codes(
                        [trainables[name] for name in together], [hessians[name] for name in together],
                        [objectives[name] for name in together], config.damp, config.row_gain_slices,
                        config.gain_aware_passes, config.descent_sweeps), strict=True))
                    bar.update(len(together))
            for name in names:
                losses[f"gptq {name}"] = [errors[name][k] for k in sorted(errors[name])]
            _report(on_progress, block_index, "gptq codes")
        if config.routed:
            losses["router_fit_residual"] = fit_routers_to_errors(
                block, trainables, inputs, block_kwargs, config, generator, block_index, progress
            )
            _report(on_progress, block_index, "router fit")
        _train_stage(
            block, trainables, inputs, targets, block_kwargs, config, "stage2", losses, generator,
            layer_params, block_index, progress, on_progress,
        )
        state = {}
        for name, module in trainables.items():
            for key, tensor in module.to_mobilinear().state_dict().items():
                state[f"{name}.{key}"] = tensor.detach().cpu().contiguous()
    finally:
        for name, linear in originals.items():
            _swap(block, name, linear)
    return BlockResult(state, losses, time.perf_counter() - started, tuple(unreached))


def truncation_errors(module: TrainableSlicedLinear, x: torch.Tensor) -> torch.Tensor:
    """``[tokens, K-1]``: column e-1 is ``||x (W_e - W)^T||^2``, the output error a token keeps at e slices."""
    with torch.no_grad():
        weights = module.fake_weights(module.num_slices - 1)
        return torch.stack([(x @ (w - module.weight).T).pow(2).sum(dim=-1) for w in weights], dim=-1)


def fit_routers_to_errors(
    block: nn.Module,
    trainables: dict[str, TrainableSlicedLinear],
    inputs: torch.Tensor,
    block_kwargs: dict[str, Any],
    config: CalibrationConfig,
    generator: torch.Generator,
    block_index: int = 0,
    progress: bool = False,
) -> list[float]:
    """Fit every router's logits to the log truncation error of its tokens (:func:`fit_routers`, the block's
    inputs sampled at every slice); returns each fit's residual, in the order of the linears reached."""
    per_batch = max(1, math.ceil(ROUTER_FIT_TOKENS / math.ceil(len(inputs) / config.batch_size)))
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in trainables}

    def keep_sample(name: str) -> Callable[..., None]:
        def hook(module: TrainableSlicedLinear, args: tuple) -> None:
            tokens = args[0].detach().reshape(-1, module.weight.shape[1])
            pick = torch.randperm(len(tokens), generator=generator, device=generator.device)[:per_batch]
            seen[name].append(tokens[pick])

        return hook

    for module in trainables.values():
        module.uniform_slices, module.routing = module.num_slices, False
    handles = [module.register_forward_pre_hook(keep_sample(name)) for name, module in trainables.items()]
    # An expert no token reached gets a constant router (every token alike): its thresholds are whole slice
    # counts at the grid budgets (mobiquant.precision.calibrate_thresholds), and a budget between two grid points
    # interpolates them to a fraction that must not rank tokens by an unfitted router.
    try:
        with compute_precision(config, inputs.device):
            _batched_outputs(block, inputs, block_kwargs, config.batch_size)
    finally:
        for handle in handles:
            handle.remove()
    reached = [name for name in trainables if seen[name]]
    for name in trainables.keys() - set(reached):
        with torch.no_grad():
            router = trainables[name].router
            for param in (router.fc2.weight, router.fc2.bias, router.norm_weight):
                param.zero_()
    xs = [torch.cat(seen.pop(name)).float() for name in reached]
    return fit_routers([trainables[name].router for name in reached], xs,
                       [truncation_errors(trainables[name], x) for name, x in zip(reached, xs, strict=True)],
                       f"block {block_index} router fit" if progress else None)


def _train_stage(
    block: nn.Module,
    trainables: dict[str, TrainableSlicedLinear],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    block_kwargs: dict[str, Any],
    config: CalibrationConfig,
    stage: str,
    losses: dict[str, list[float]],
    generator: torch.Generator,
    layer_params: dict[str, float],
    block_index: int,
    progress: bool,
    on_progress: ProgressCallback | None,
) -> None:
    epochs = config.epochs_stage1 if stage == "stage1" else config.epochs_stage2
    routed = stage == "stage2" and config.routed
    # Compensated codes leave the clipping frozen: only routers remain to train, and only on routed steps.
    codes_fixed = all(m.fixed is not None for m in trainables.values())
    if codes_fixed and not routed:
        return
    # Stage 1 fits slice 1 alone; stage 2 draws a slice count per step (0 means draw); a control uses one.
    fixed_slices = 1 if stage == "stage1" else 0
    if config.target_bits is not None:
        fixed_slices = int(config.target_bits // 2)
    clip_params = [] if codes_fixed else [p for m in trainables.values() for p in (m.upper_logit, m.lower_logit)]
    groups = [{"params": clip_params, "lr": config.lr_clip, "weight_decay": 0.0}] if clip_params else []
    if routed:
        router_params = [p for m in trainables.values() for p in m.router.parameters()]
        groups.append({"params": router_params, "lr": config.lr_router, "weight_decay": 1e-4})
    for module in trainables.values():
        if module.router is not None:
            module.router.requires_grad_(routed)
    optimizer = torch.optim.AdamW(groups)
    n = len(inputs)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = epochs * steps_per_epoch
    bar = tqdm(
        total=total_steps, desc=f"block {block_index} {stage}", disable=not progress or total_steps == 0, leave=False
    )
    step = 0
    for _epoch in range(epochs):
        order = torch.randperm(n, generator=generator, device=generator.device)
        epoch_loss = 0.0
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            fraction = step / max(total_steps - 1, 1)
            temperature = config.temperature_start * (config.temperature_end / config.temperature_start) ** fraction
            slices = fixed_slices or int(torch.randint(1, config.num_slices + 1, (1,), generator=generator,
                                                       device=generator.device))
            # Routed steps alternate with uniform steps at a random slice count, so the shared clipping
            # stays fitted to every uniform precision while the routers learn which tokens need more.
            routing_step = routed and (step % 2 == 0 or codes_fixed)
            for module in trainables.values():
                module.temperature = temperature
                module.uniform_slices = slices
                module.routing = routing_step
                module.expected_slices, module.served_tokens = None, 0
            with compute_precision(config, inputs.device):
                out = run_block(block, inputs[idx], block_kwargs)
            loss = F.mse_loss(out.float(), targets[idx])
            total = loss
            if routing_step:
                fraction_of_range = float(torch.rand((), generator=generator, device=generator.device))
                target_bits = 2.0 + (2.0 * config.num_slices - 2.0) * fraction_of_range
                bits = _routed_bits(trainables, layer_params)
                total = loss + config.budget_weight * (bits - target_bits) ** 2
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            epoch_loss += float(loss.detach()) * len(idx)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3e}")
        losses[stage].append(epoch_loss / n)
        if on_progress is not None:
            on_progress({"block": block_index, "stage": stage, "epoch": _epoch + 1, "epochs": epochs,
                         "loss": losses[stage][-1]})
    bar.close()


def _routed_bits(trainables: dict[str, TrainableSlicedLinear], layer_params: dict[str, float]) -> torch.Tensor:
    """Average bits of a routed step: each layer's expected slices weighted by its parameters and by the tokens it
    served, as ``track_bits`` counts them (an expert's linears serve only the tokens routed to it; a layer that
    served none this step weighs nothing). Every layer of a dense block serves every token: plain parameter
    weights."""
    most = max(m.served_tokens for m in trainables.values())
    ran = {name: m for name, m in trainables.items() if m.served_tokens}
    weights = {name: layer_params[name] * (m.served_tokens / most) for name, m in ran.items()}
    weighted = sum(m.expected_slices * weights[name] for name, m in ran.items())
    return 2.0 * weighted / sum(weights.values())


def quantized_block(block: nn.Module, arch: Architecture, state: dict[str, torch.Tensor],
                    config: CalibrationConfig) -> nn.Module:
    """``block`` with its quantized linears replaced by MoBiLinear layers holding ``state``."""
    for name, linear in arch.quantized_linears(block).items():
        with torch.device(linear.weight.device):  # load_state_dict copies into the layer's own tensors
            layer = MoBiLinear(linear.in_features, linear.out_features, config.num_slices, config.group_size,
                               bias=linear.bias is not None,
                               router_hidden=config.router_hidden if config.routed else None,
                               dtype=linear.weight.dtype)
        prefix = f"{name}."
        layer.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        _swap(block, name, layer)
    return block
