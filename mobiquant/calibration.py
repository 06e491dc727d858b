"""Block-by-block calibration (OmniQuant-style) of MoBiSlice clipping and MoBiRoute routers.

For each transformer block:

* stage 1 fits learnable weight clipping (LWC) so that the block computed with slice 1 alone matches
  the full-precision block output;
* between the stages each router is fitted to rank its tokens by the output error they keep at each
  slice count (``fit_routers_to_errors``), so stage 2 starts from routers that already know which
  tokens need more slices;
* stage 2 trains clipping and routers jointly: the block under routed slices against the
  full-precision output, plus a budget term pulling the average bits toward a target sampled anew at
  every step, so one router serves the whole range of budgets.

A single-precision *control* (``target_bits`` set) trains the same clipping for one slice count, with
no router: the baseline that MoBiQuant's one checkpoint is compared against.

Blocks are independent units of work in ``parallel`` mode (every block trains on full-precision inputs
captured once); in ``sequential`` mode block ``i`` trains on the outputs of the already-quantized blocks
before it. Each finished block is saved, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from mobiquant.arch import Architecture, architecture_for
from mobiquant.clip_search import clip_logit, input_hessians, search_clipping
from mobiquant.layers import MoBiLinear, MoBiRouter, gate_scores
from mobiquant.slicing import check_slicing_shape, group_min_max, scale_zero_from_range, slice_weight
from mobiquant.sources import file_sha256

ProgressCallback = Callable[[dict[str, Any]], None]
MODES = ("parallel", "sequential")
# Slice count used to propagate inputs between blocks in sequential mode: the 4-bit model sits in the
# middle of the range every block will be run at.
SEQUENTIAL_PROPAGATION_SLICES = 2
RESULT_FORMAT = "mobiquant-block-v1"
# Part of every resume key: bump it when a change to the algorithm changes calibration results, so that
# results saved by an older version are recomputed rather than reused.
ALGORITHM_REVISION = 4
# Router fitting: tokens sampled per layer and full-batch Adam steps. Measured on SmolLM2 block 5, this
# budget leaves 4-30% more output error than the oracle allocation at 3 bits (random routing: 40-110%
# more), at about a second per layer on one CPU core.
ROUTER_FIT_TOKENS = 2048
ROUTER_FIT_STEPS = 150
ROUTER_FIT_LR = 1e-2
# Clip search objective of the elastic checkpoint: weights of the absolute output errors at 1, 2, 3, 4
# slices (errors fall about 16-fold per slice). One shared clipping cannot be best at every precision.
# On SmolLM2-135M (g64, uniform ppl at 2/4/6 bits, before LWC), clipping for 2 bits alone gives
# 268/73.8/51.0; weights (1, 16, 32) 2747/48.0/44.0; (1, 24, 32) 4019/47.8/44.0; clipping for 4 bits
# alone gives 4 bits 46.6 and for 6 bits alone 6 bits 43.4 (full grid). These weights keep 4 and 6 bits
# within 3% of their single-precision optimum and give up 2 bits.
DEFAULT_CLIP_SEARCH_WEIGHTS = (1.0, 24.0, 32.0, 0.0)


@dataclass(frozen=True)
class CalibrationConfig:
    num_slices: int = 4
    group_size: int = 128
    router_hidden: int = 32
    epochs_stage1: int = 1
    epochs_stage2: int = 1
    batch_size: int = 4
    lr_clip: float = 5e-3
    lr_router: float = 2e-3
    budget_weight: float = 0.05
    temperature_start: float = 1.0
    temperature_end: float = 0.05
    clip_init: float = 6.0
    clip_search: bool = True
    """Start LWC from the activation-aware clipping of ``mobiquant.clip_search`` instead of ``clip_init``."""
    clip_search_weights: tuple[float, ...] | None = None
    """Weight of the output error at 1, 2, ... slices in the elastic checkpoint's clip search (a control
    weighs only its own slice count); ``None`` takes ``DEFAULT_CLIP_SEARCH_WEIGHTS``."""
    mode: str = "parallel"
    seed: int = 0
    target_bits: float | None = None
    """Set for a single-precision control: clipping trained for ``target_bits / 2`` slices, no router."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.num_slices < 1:
            raise ValueError(f"num_slices must be at least 1, got {self.num_slices}")
        if self.target_bits is not None and self.target_bits not in [2.0 * k for k in range(1, self.num_slices + 1)]:
            raise ValueError(f"a control's target_bits must be an even number of bits in 2..{2 * self.num_slices}")
        if min(self.epochs_stage1, self.epochs_stage2) < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
        if self.clip_search_weights is not None:
            weights = tuple(float(w) for w in self.clip_search_weights)
            object.__setattr__(self, "clip_search_weights", weights)
            if len(weights) != self.num_slices or min(weights) < 0 or max(weights) <= 0:
                raise ValueError(f"clip_search_weights needs {self.num_slices} non-negative weights, not all zero; "
                                 f"got {list(weights)}")

    @property
    def clip_objective(self) -> dict[int, float]:
        """Slice count -> weight of its output error in the clip search."""
        if self.target_bits is not None:
            return {int(self.target_bits // 2): 1.0}
        padded = DEFAULT_CLIP_SEARCH_WEIGHTS + (0.0,) * self.num_slices
        weights = self.clip_search_weights or padded[: self.num_slices]
        return {k: w for k, w in enumerate(weights, start=1) if w > 0}

    @property
    def routed(self) -> bool:
        return self.target_bits is None and self.num_slices > 1 and self.router_hidden > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CalibrationConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown calibration options: {sorted(unknown)}")
        return cls(**values)

    def digest(self) -> str:
        """Hash of every setting that changes the result (the resume key, with model sha and block)."""
        keyed = {**self.to_dict(), "algorithm_revision": ALGORITHM_REVISION}
        return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def _floor_ste(x: torch.Tensor) -> torch.Tensor:
    """``floor`` in the forward pass, identity gradient (straight-through estimator)."""
    return x + (torch.floor(x) - x).detach()


class TrainableSlicedLinear(nn.Module):
    """A frozen linear weight fake-quantized at 1..K slices with learnable clipping and a router."""

    def __init__(self, linear: nn.Linear, config: CalibrationConfig) -> None:
        super().__init__()
        check_slicing_shape(linear.in_features, config.group_size)
        self.register_buffer("weight", linear.weight.detach().float().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.group_size, self.num_slices = config.group_size, config.num_slices
        w_min, w_max = group_min_max(self.weight, config.group_size)
        self.register_buffer("w_min", w_min)
        self.register_buffer("w_max", w_max)
        self.upper_logit = nn.Parameter(torch.full_like(w_max, config.clip_init))
        self.lower_logit = nn.Parameter(torch.full_like(w_min, config.clip_init))
        self.router = (
            MoBiRouter(linear.in_features, config.num_slices, config.router_hidden) if config.routed else None
        )
        self.uniform_slices: int = 1
        self.routing: bool = False
        self.temperature: float = 1.0
        self.expected_slices: torch.Tensor | None = None
        self.hard_slices: torch.Tensor | None = None

    def clip_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(self.upper_logit), torch.sigmoid(self.lower_logit)

    def start_clipping_from_search(self, hessian: torch.Tensor, slice_weights: dict[int, float]) -> None:
        """Set the LWC parameters to the clip search's factors for inputs with ``X^T X = hessian``."""
        no_clip = float(torch.sigmoid(self.upper_logit.detach().max()))
        upper, lower = search_clipping(self.weight, hessian, self.group_size, slice_weights, no_clip=no_clip)
        with torch.no_grad():
            self.upper_logit.copy_(clip_logit(upper))
            self.lower_logit.copy_(clip_logit(lower))

    def _codes_u(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        upper, lower = self.clip_factors()
        scale, zero = scale_zero_from_range(self.w_min * lower, self.w_max * upper)
        s = scale.repeat_interleave(self.group_size, dim=-1)
        z = zero.repeat_interleave(self.group_size, dim=-1)
        return self.weight / s + z, s, z

    def fake_weights(self, up_to: int) -> list[torch.Tensor]:
        """``[W_1, ..., W_up_to]`` with gradients to the clipping parameters."""
        u, s, z = self._codes_u()
        weights = []
        for k in range(1, up_to + 1):
            per_level = 4.0 ** (k - 1)
            codes = torch.clamp(_floor_ste(u * per_level), 0, 4.0 * per_level - 1)
            weights.append(s * ((codes + 0.5) / per_level - z))
        return weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.routing or self.router is None:
            return F.linear(x, self.fake_weights(self.uniform_slices)[-1], self.bias)
        weights = self.fake_weights(self.num_slices)
        logits = self.router(x)
        soft = torch.cumprod(torch.sigmoid(logits / self.temperature), dim=-1)
        hard = (gate_scores(logits) > 0).to(soft.dtype)
        masks = hard + (soft - soft.detach())
        self.expected_slices = 1 + soft.sum(dim=-1).mean()
        self.hard_slices = 1 + hard.sum(dim=-1).mean()
        out = F.linear(x, weights[0], self.bias)
        for e in range(1, self.num_slices):
            residual = F.linear(x, weights[e] - weights[e - 1])
            out = out + masks[..., e - 1 : e].to(out.dtype) * residual
        return out

    def to_mobilinear(self) -> MoBiLinear:
        upper, lower = self.clip_factors()
        out_features, in_features = self.weight.shape
        layer = MoBiLinear(
            in_features,
            out_features,
            self.num_slices,
            self.group_size,
            bias=self.bias is not None,
            router_hidden=self.router.fc1.out_features if self.router is not None else None,
        )
        sliced = slice_weight(self.weight, self.group_size, self.num_slices, clip=(upper.detach(), lower.detach()))
        layer.load_sliced(sliced, self.bias)
        if self.router is not None:
            layer.router.load_state_dict(self.router.state_dict())
        return layer


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


@dataclass
class BlockResult:
    state: dict[str, torch.Tensor]
    """MoBiLinear state of every quantized linear, keyed ``<linear>.<tensor>`` inside the block."""
    losses: dict[str, list[float]]
    seconds: float


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
) -> BlockResult:
    """Calibrate one block; ``targets`` default to the full-precision block's outputs on ``inputs``.

    The block's own linears are left untouched; the result holds the quantized state.
    """
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed * 100_003 + block_index)
    torch.manual_seed(config.seed * 100_003 + block_index)
    block = block.float()
    inputs = inputs.float()
    originals = arch.quantized_linears(block)
    hessians: dict[str, torch.Tensor] = {}
    if config.clip_search:
        # One pass of the unquantized block gives the clip search its inputs and, in parallel mode, the targets.
        hessians, outputs = input_hessians(
            originals, lambda: _batched_outputs(block, inputs, block_kwargs, config.batch_size)
        )
        targets = outputs if targets is None else targets
    elif targets is None:
        targets = _batched_outputs(block, inputs, block_kwargs, config.batch_size)
    trainables = {name: TrainableSlicedLinear(linear, config) for name, linear in originals.items()}
    for name, module in trainables.items():
        if name in hessians:
            module.start_clipping_from_search(hessians[name], config.clip_objective)
    for param in block.parameters():
        param.requires_grad_(False)
    for name, module in trainables.items():
        _swap(block, name, module)
    layer_params = {name: float(m.weight.numel()) for name, m in trainables.items()}
    total_params = sum(layer_params.values())
    losses: dict[str, list[float]] = {"stage1": [], "stage2": []}
    try:
        _train_stage(
            block, trainables, inputs, targets, block_kwargs, config, "stage1", losses, generator,
            layer_params, total_params, block_index, progress, on_progress,
        )
        if config.routed:
            losses["router_fit_residual"] = fit_routers_to_errors(
                block, trainables, inputs, block_kwargs, config, generator
            )
        _train_stage(
            block, trainables, inputs, targets, block_kwargs, config, "stage2", losses, generator,
            layer_params, total_params, block_index, progress, on_progress,
        )
        state = {}
        for name, module in trainables.items():
            for key, tensor in module.to_mobilinear().state_dict().items():
                state[f"{name}.{key}"] = tensor.contiguous()
    finally:
        for name, linear in originals.items():
            _swap(block, name, linear)
    return BlockResult(state, losses, time.perf_counter() - started)


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
) -> list[float]:
    """Fit every router's logits to the log truncation error of its tokens; returns each fit's residual.

    Gate ``e`` buys slice ``e+1``, which removes nearly all of the error ``err_e`` left at ``e`` slices
    (the next slice's error is about 16 times smaller). A router whose logit ``e`` predicts
    ``log err_e`` therefore ranks (token, slice) pairs by the error each removes, and a threshold on
    those scores spends a layer's bits where they remove the most output error. The errors fall with
    ``e``, so the fitted logits already respect the nesting. Targets are centred per layer: logit 0 (the
    training mask's cut) sits in the middle of the range. The residual reported is the mean squared
    fit error over the targets' variance (0 is a perfect ranking, 1 no better than a constant).
    """
    per_batch = max(1, math.ceil(ROUTER_FIT_TOKENS / math.ceil(len(inputs) / config.batch_size)))
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in trainables}

    def keep_sample(name: str) -> Callable[..., None]:
        def hook(module: TrainableSlicedLinear, args: tuple) -> None:
            tokens = args[0].detach().reshape(-1, module.weight.shape[1])
            pick = torch.randperm(len(tokens), generator=generator)[:per_batch]
            seen[name].append(tokens[pick])

        return hook

    for module in trainables.values():
        module.uniform_slices, module.routing = module.num_slices, False
    handles = [module.register_forward_pre_hook(keep_sample(name)) for name, module in trainables.items()]
    try:
        _batched_outputs(block, inputs, block_kwargs, config.batch_size)
    finally:
        for handle in handles:
            handle.remove()
    residuals = []
    for name, module in trainables.items():
        x = torch.cat(seen[name])
        target = truncation_errors(module, x).clamp_min(1e-30).log()
        target = target - target.mean()
        module.router.requires_grad_(True)
        optimizer = torch.optim.Adam(module.router.parameters(), lr=ROUTER_FIT_LR)
        for _step in range(ROUTER_FIT_STEPS):
            loss = F.mse_loss(module.router(x), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        residuals.append(float(loss.detach()) / max(float(target.var()), 1e-12))
    return residuals


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
    total_params: float,
    block_index: int,
    progress: bool,
    on_progress: ProgressCallback | None,
) -> None:
    epochs = config.epochs_stage1 if stage == "stage1" else config.epochs_stage2
    routed = stage == "stage2" and config.routed
    # Stage 1 fits slice 1 alone; stage 2 draws a slice count per step (0 means draw); a control uses one.
    fixed_slices = 1 if stage == "stage1" else 0
    if config.target_bits is not None:
        fixed_slices = int(config.target_bits // 2)
    clip_params = [p for m in trainables.values() for p in (m.upper_logit, m.lower_logit)]
    groups = [{"params": clip_params, "lr": config.lr_clip, "weight_decay": 0.0}]
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
        order = torch.randperm(n, generator=generator)
        epoch_loss = 0.0
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            fraction = step / max(total_steps - 1, 1)
            temperature = config.temperature_start * (config.temperature_end / config.temperature_start) ** fraction
            slices = fixed_slices or int(torch.randint(1, config.num_slices + 1, (1,), generator=generator))
            # Routed steps alternate with uniform steps at a random slice count, so the shared clipping
            # stays fitted to every uniform precision while the routers learn which tokens need more.
            routing_step = routed and step % 2 == 0
            for module in trainables.values():
                module.temperature = temperature
                module.uniform_slices = slices
                module.routing = routing_step
            out = run_block(block, inputs[idx], block_kwargs)
            loss = F.mse_loss(out, targets[idx])
            total = loss
            if routing_step:
                target_bits = 2.0 + (2.0 * config.num_slices - 2.0) * float(torch.rand((), generator=generator))
                weighted = sum(m.expected_slices * layer_params[name] for name, m in trainables.items())
                bits = 2.0 * weighted / total_params
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


def _model_blocks(model: nn.Module) -> tuple[Architecture, nn.ModuleList]:
    arch = architecture_for(model.config.model_type)
    return arch, arch.block_list(model)


def check_model_shapes(model: nn.Module, group_size: int) -> None:
    """Fail before any heavy work if a quantized linear cannot be sliced with ``group_size``."""
    arch, blocks = _model_blocks(model)
    for index, block in enumerate(blocks):
        for name, linear in arch.quantized_linears(block).items():
            try:
                check_slicing_shape(linear.in_features, group_size)
            except ValueError as error:
                raise ValueError(f"block {index} {name}: {error}") from error
            if not torch.isfinite(linear.weight).all():
                raise ValueError(f"block {index} {name}: weight contains NaN or Inf values")


class _StopForward(Exception):
    """Raised by the capture hook once every needed input is recorded."""


def capture_inputs(model: nn.Module, samples: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Full-precision inputs of every block (each ``[n, seqlen, hidden]``) and the block keyword arguments.

    Samples run one at a time, so the captured keyword arguments (causal mask, rotary embeddings) are
    those of a batch of one; they broadcast over any batch of the same sequence length.
    """
    _arch, blocks = _model_blocks(model)
    inputs: list[list[torch.Tensor]] = [[] for _ in blocks]
    block_kwargs: dict[str, Any] = {}

    def record(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs[index].append(hidden.detach().float().cpu())
            if index == 0 and not block_kwargs:
                block_kwargs.update({k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")})
                block_kwargs["use_cache"] = False

        return hook

    handles = [block.register_forward_pre_hook(record(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            for row in samples:
                model(row.unsqueeze(0).to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(chunks) for chunks in inputs], block_kwargs


def save_block_kwargs(block_kwargs: dict[str, Any], path: Path) -> None:
    """Tensors (and tuples of tensors) to safetensors; the structure and plain values to its metadata."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}
    for name, value in block_kwargs.items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value.detach().cpu().contiguous()
            layout[name] = {"tensor": name}
        elif isinstance(value, tuple | list) and all(isinstance(v, torch.Tensor) for v in value):
            keys = [f"{name}.{i}" for i in range(len(value))]
            tensors.update({k: v.detach().cpu().contiguous() for k, v in zip(keys, value, strict=True)})
            layout[name] = {"tuple": keys}
        elif value is None or isinstance(value, bool | int | float | str):
            layout[name] = {"value": value}
        else:
            raise TypeError(f"cannot store block argument {name!r} of type {type(value).__name__}")
    _save_safetensors(tensors, Path(path), {"layout": json.dumps(layout)})


def load_block_kwargs(path: Path) -> dict[str, Any]:
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        layout = json.loads(handle.metadata()["layout"])
    block_kwargs: dict[str, Any] = {}
    for name, spec in layout.items():
        if "tensor" in spec:
            block_kwargs[name] = tensors[spec["tensor"]]
        elif "tuple" in spec:
            block_kwargs[name] = tuple(tensors[k] for k in spec["tuple"])
        else:
            block_kwargs[name] = spec["value"]
    return block_kwargs


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``save_file`` with its write failures (disk full, size limit) raised as one clear ``OSError``."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as error:
        path.unlink(missing_ok=True)
        raise OSError(f"could not write {path}: {error}") from error


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    _save_safetensors(tensors, partial, metadata)
    partial.replace(path)


def fp_input_path(capture_dir: Path, index: int) -> Path:
    return Path(capture_dir) / f"block_{index:04d}.safetensors"


def quantized_input_path(capture_dir: Path, index: int, digest: str) -> Path:
    return Path(capture_dir) / f"block_{index:04d}.quantized-{digest}.safetensors"


def capture_block_inputs(model: nn.Module, samples: torch.Tensor, capture_dir: Path,
                         model_key: str = "") -> dict[str, Any]:
    """Write every block's full-precision inputs and the block arguments under ``capture_dir``.

    Returns the manifest (also written as ``manifest.json``). A capture whose manifest matches the
    samples is reused.
    """
    capture_dir = Path(capture_dir)
    samples_sha = hashlib.sha256(samples.cpu().numpy().tobytes()).hexdigest()
    manifest_path = capture_dir / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("samples_sha256") == samples_sha and manifest.get("model", "") == model_key:
            return manifest
    inputs, block_kwargs = capture_inputs(model, samples)
    capture_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for index, hidden in enumerate(inputs):
        path = fp_input_path(capture_dir, index)
        _atomic_save({"hidden": hidden.contiguous()}, path, {"block": str(index)})
        files[path.name] = file_sha256(path)
    save_block_kwargs(block_kwargs, capture_dir / "kwargs.safetensors")
    manifest = {"num_blocks": len(inputs), "samples_sha256": samples_sha, "model": model_key,
                "shape": list(inputs[0].shape), "files": files}
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest


def load_block(model_dir: Path, index: int) -> tuple[nn.Module, Architecture]:
    """Block ``index`` of the model in ``model_dir`` with its weights, without loading the other blocks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    arch = architecture_for(config.model_type)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    block = arch.block_list(skeleton)[index]
    prefix = arch.block_prefix(index)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if key.startswith(prefix):
                    state[key[len(prefix) :]] = handle.get_tensor(key).float()
    expected = set(block.state_dict())
    if set(state) != expected:
        raise ValueError(f"block {index} in {model_dir}: missing {sorted(expected - set(state))[:5]}")
    block = block.to_empty(device="cpu").float()
    block.load_state_dict(state)
    return block, arch


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's configuration and of every weight it will quantize (part of the resume key)."""
    arch, blocks = _model_blocks(model)
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for block in blocks:
        for linear in arch.quantized_linears(block).values():
            digest.update(linear.weight.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def result_is_complete(out_path: Path, config: CalibrationConfig, block_index: int, model_key: str = "") -> bool:
    """Whether ``out_path`` holds block ``block_index`` calibrated with ``config`` from model ``model_key``."""
    if not Path(out_path).exists():
        return False
    with safe_open(str(out_path), "pt") as handle:
        meta = handle.metadata() or {}
    return (meta.get("format") == RESULT_FORMAT and meta.get("config_digest") == config.digest()
            and meta.get("block") == str(block_index) and meta.get("model", "") == model_key)


def read_result_report(out_path: Path) -> dict[str, Any]:
    with safe_open(str(out_path), "pt") as handle:
        meta = handle.metadata()
    return {"block": int(meta["block"]), "losses": json.loads(meta["losses"]), "seconds": float(meta["seconds"]),
            "path": str(out_path), "sha256": file_sha256(Path(out_path))}


def save_block_result(result: BlockResult, out_path: Path, config: CalibrationConfig, block_index: int,
                      model_key: str = "") -> None:
    metadata = {"format": RESULT_FORMAT, "config_digest": config.digest(), "block": str(block_index),
                "model": model_key,
                "losses": json.dumps(result.losses), "seconds": f"{result.seconds:.3f}",
                "config": json.dumps(config.to_dict(), sort_keys=True)}
    _atomic_save(result.state, Path(out_path), metadata)


def quantized_block(block: nn.Module, arch: Architecture, state: dict[str, torch.Tensor],
                    config: CalibrationConfig) -> nn.Module:
    """``block`` with its quantized linears replaced by MoBiLinear layers holding ``state``."""
    for name, linear in arch.quantized_linears(block).items():
        layer = MoBiLinear(linear.in_features, linear.out_features, config.num_slices, config.group_size,
                           bias=linear.bias is not None,
                           router_hidden=config.router_hidden if config.routed else None,
                           dtype=linear.weight.dtype)
        prefix = f"{name}."
        layer.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        _swap(block, name, layer)
    return block


def calibrate_block_from_files(
    model_dir: Path,
    block_index: int,
    capture_dir: Path,
    config: CalibrationConfig,
    out_path: Path,
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """One unit of layer-parallel work: calibrate block ``block_index`` from captured inputs, save it.

    Returns a report (losses, seconds, sha256 of the result). A result already complete for this
    configuration is not recomputed (``cached`` is then true).
    """
    out_path = Path(out_path)
    if result_is_complete(out_path, config, block_index):
        return {**read_result_report(out_path), "cached": True}
    block, arch = load_block(model_dir, block_index)
    block_kwargs = load_block_kwargs(Path(capture_dir) / "kwargs.safetensors")
    fp_inputs = load_file(str(fp_input_path(capture_dir, block_index)))["hidden"]
    inputs, targets = fp_inputs, None
    if config.mode == "sequential" and block_index > 0:
        quantized_inputs = quantized_input_path(capture_dir, block_index, config.digest())
        if not quantized_inputs.exists():
            raise FileNotFoundError(f"sequential mode: block {block_index - 1} has not been calibrated yet")
        inputs = load_file(str(quantized_inputs))["hidden"]
        targets = _batched_outputs(block, fp_inputs, block_kwargs, config.batch_size)
    result = calibrate_block(block, inputs, block_kwargs, arch, config, targets, block_index, progress, on_progress)
    if config.mode == "sequential":
        _propagate(block, arch, result.state, config, inputs, block_kwargs,
                   quantized_input_path(capture_dir, block_index + 1, config.digest()))
    save_block_result(result, out_path, config, block_index)
    return {**read_result_report(out_path), "cached": False}


def _propagate(block: nn.Module, arch: Architecture, state: dict[str, torch.Tensor], config: CalibrationConfig,
               inputs: torch.Tensor, block_kwargs: dict[str, Any], out_path: Path) -> torch.Tensor:
    """Outputs of the quantized block (the next block's inputs in sequential mode), saved to ``out_path``."""
    originals = arch.quantized_linears(block)
    quantized_block(block, arch, state, config)
    for layer in arch.quantized_linears(block).values():
        layer.uniform_slices = min(SEQUENTIAL_PROPAGATION_SLICES, config.num_slices)
    outputs = _batched_outputs(block, inputs, block_kwargs, config.batch_size)
    for name, linear in originals.items():
        _swap(block, name, linear)
    _atomic_save({"hidden": outputs.contiguous()}, out_path, {})
    return outputs


def apply_block_results(model: nn.Module, results: dict[int, dict[str, torch.Tensor]],
                        config: CalibrationConfig) -> nn.Module:
    """Replace the quantized linears of every block by MoBiLinear layers holding the calibrated state."""
    arch, blocks = _model_blocks(model)
    missing = sorted(set(range(len(blocks))) - set(results))
    if missing:
        raise ValueError(f"no calibration result for blocks {missing}")
    for index, block in enumerate(blocks):
        quantized_block(block, arch, results[index], config)
    return model


def assemble_model(model_dir: Path, block_paths: list[Path], config: CalibrationConfig) -> nn.Module:
    """The full-precision model of ``model_dir`` with every block replaced by its calibrated result."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    results = {}
    for path in block_paths:
        with safe_open(str(path), "pt") as handle:
            index = int(handle.metadata()["block"])
        results[index] = load_file(str(path))
    model = apply_block_results(model, results, config)
    model.config.quantization_config = quantization_config(config, architecture_for(model.config.model_type))
    return model.eval()


def quantization_config(config: CalibrationConfig, arch: Architecture) -> dict[str, Any]:
    """The ``quantization_config`` entry of a MoBiQuant checkpoint's ``config.json``."""
    return {
        "quant_method": "mobiquant",
        "format": "bitplanes-msb-int32-v1",
        "num_slices": config.num_slices,
        "group_size": config.group_size,
        "router_hidden": config.router_hidden if config.routed else 0,
        "blocks": arch.blocks,
        "linears": list(arch.linears),
        "calibration": {k: v for k, v in config.to_dict().items() if k not in ("num_slices", "group_size")},
    }


def quantize_model(
    model: nn.Module,
    samples: torch.Tensor,
    config: CalibrationConfig,
    work_dir: Path,
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
) -> nn.Module:
    """Calibrate ``model`` in this process and return it with MoBiLinear layers and calibrated thresholds.

    Every finished block is saved under ``work_dir``; calling again with the same work directory and
    configuration resumes, recomputing only the unfinished blocks.
    """
    from mobiquant.precision import calibrate_thresholds

    check_model_shapes(model, config.group_size)
    arch, blocks = _model_blocks(model)
    model_key = model_fingerprint(model)
    work_dir = Path(work_dir)
    capture_dir = work_dir / "capture"
    capture_block_inputs(model, samples, capture_dir, model_key)
    block_kwargs = load_block_kwargs(capture_dir / "kwargs.safetensors")
    results: dict[int, dict[str, torch.Tensor]] = {}
    bar = tqdm(total=len(blocks), desc="calibrating blocks", disable=not progress)
    for index, block in enumerate(blocks):
        out_path = work_dir / "blocks" / f"block_{index:04d}.safetensors"
        if not result_is_complete(out_path, config, index, model_key):
            fp_inputs = load_file(str(fp_input_path(capture_dir, index)))["hidden"]
            inputs, targets = fp_inputs, None
            if config.mode == "sequential" and index > 0:
                inputs = load_file(str(quantized_input_path(capture_dir, index, config.digest())))["hidden"]
                targets = _batched_outputs(block.float(), fp_inputs, block_kwargs, config.batch_size)
            result = calibrate_block(block, inputs, block_kwargs, arch, config, targets, index, progress, on_progress)
            if config.mode == "sequential":
                _propagate(block, arch, result.state, config, inputs, block_kwargs,
                           quantized_input_path(capture_dir, index + 1, config.digest()))
            save_block_result(result, out_path, config, index, model_key)
        elif config.mode == "sequential" and not quantized_input_path(capture_dir, index + 1, config.digest()).exists():
            fp_or_quantized = (fp_input_path(capture_dir, 0) if index == 0
                               else quantized_input_path(capture_dir, index, config.digest()))
            _propagate(block.float(), arch, load_file(str(out_path)), config,
                       load_file(str(fp_or_quantized))["hidden"], block_kwargs,
                       quantized_input_path(capture_dir, index + 1, config.digest()))
        results[index] = load_file(str(out_path))
        report = read_result_report(out_path)
        bar.update(1)
        bar.set_postfix(loss=f"{report['losses']['stage2'][-1] if report['losses']['stage2'] else 0:.3e}")
    bar.close()
    model = apply_block_results(model.float(), results, config)
    model.config.quantization_config = quantization_config(config, arch)
    if config.routed:
        calibrate_thresholds(model, samples)
    return model.eval()
