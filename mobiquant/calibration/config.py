"""Calibration settings: what changes a calibration's result, and so keys its resume."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mobiquant.arch import Architecture, summarize_linears
from mobiquant.slicing import FORMAT, check_num_slices

MODES = ("parallel", "sequential")
COMPUTE_DTYPES = ("float32", "tfloat32", "bfloat16")
# Slice count used to propagate inputs between blocks in sequential mode: the 4-bit model sits in the
# middle of the range every block will be run at.
SEQUENTIAL_PROPAGATION_SLICES = 2
RESULT_FORMAT = "mobiquant-block-v1"
# Part of every resume key: bump it when a change to the algorithm changes calibration results, so that
# results saved by an older version are recomputed rather than reused.
ALGORITHM_REVISION = 11
# Router fitting: tokens sampled per layer and full-batch Adam steps (docs/method.md gives the measured
# gap to the oracle allocation this budget leaves).
ROUTER_FIT_TOKENS = 2048
ROUTER_FIT_STEPS = 150
ROUTER_FIT_LR = 1e-2
# Clip search objective of the elastic checkpoint: weights of the absolute output errors at 1, 2, 3, 4
# slices (errors fall about 16-fold per slice, so equal weights would let 1 slice decide everything). One
# shared clipping cannot be best at every precision: these weights favour 4, 6 and 8 bits and give up some
# of 2 bits (the measured trade-off is in docs/quality.md).
DEFAULT_CLIP_SEARCH_WEIGHTS = (1.0, 24.0, 32.0, 32.0)
# Error-compensated codes (mobiquant.gptq): weights of the absolute output errors at 1, 2, 3, 4 slices
# that the codes minimise, chosen by measurement (docs/quality.md). GPTQ can weigh at most 8-bit codes.
DEFAULT_PRECISION_WEIGHTS = (2.0, 24.0, 32.0, 8.0)
# Per-linear defaults (keyed as ``module_precision_weights``; a user's entries add to them and win). The
# value projection decides one slice's quality (docs/quality.md): its codes weigh one slice most. Its range
# keeps the shared clip search: a 2-bit clipping of its own (1:1, 2:1, 3:1, the default until revision 10)
# halves one slice's perplexity but costs text of another domain at 4, 6 and 8 bits, where clipped weights
# stay lost; a user who needs 2 bits most can ask for it with module_clip_search_weights.
DEFAULT_MODULE_PRECISION_WEIGHTS = {"v_proj": (32.0, 24.0, 32.0, 8.0)}
DEFAULT_MODULE_CLIP_SEARCH_WEIGHTS: dict[str, tuple[float, ...]] = {}
MAX_COMPENSATED_SLICES = 4
# Row gains at 1 and 2 slices only: measured at 3 and 4 slices they cost the calibration domain 0.5%
# (docs/quality.md), where the nested codes' compromise is small and a fitted gain adds more than it removes.
DEFAULT_ROW_GAIN_SLICES = 2
DEFAULT_ELASTIC_DAMP = 0.1
# Coordinate-descent sweeps after GPTQ's pass (mobiquant.gptq): what two sweeps move is measured in docs/quality.md.
DEFAULT_DESCENT_SWEEPS = 0
# End-to-end tuning (mobiquant.calibration.end_to_end): weights of the KL at 1, 2, 3, 4 slices and Adam's peak
# learning rate, the probe's settings (docs/quality.md). One slice weighs nothing: its KL is an order of magnitude
# above the others' and, weighed, it raised theirs.
DEFAULT_END_TO_END_WEIGHTS = (0.0, 1.0, 1.0, 0.5)
DEFAULT_END_TO_END_LR = 5e-4
# Options applied after the blocks, to the assembled model: they key the end-to-end stage, not the block results.
END_TO_END_OPTIONS = ("end_to_end_steps", "end_to_end_lr", "end_to_end_weights", "end_to_end_dtype",
                      "end_to_end_schedule")
END_TO_END_DTYPES = ("float32", "bfloat16")
# Which weighted slice counts a step of the end-to-end stage runs: all of them, or one in turn (docs/method.md).
END_TO_END_SCHEDULES = ("all", "rotate")
# Past this the dampening outweighs the Hessian itself: the codes tend to plain rounding of the compensated copy.
MAX_DAMP = 10.0
_SCALAR_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
_TYPE_NAMES = {"int": "a whole number", "float": "a number", "bool": "True or False", "str": "a string"}


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
    error_compensation: bool = True
    """Choose the codes by GPTQ (``mobiquant.gptq``) once the clipping is final, instead of flooring the grid."""
    row_gain_slices: int = DEFAULT_ROW_GAIN_SLICES
    """With compensated codes, fit the row gains (``mobiquant.slicing.fit_row_gains``) of 1..``row_gain_slices``
    slices to the block's inputs; finer precisions, and all of them at 0, keep gain 1 (the v1 weights)."""
    gain_aware_passes: int = 0
    """After the first codes and their gains: passes that choose the codes again for the gained weights
    (``nested_codes(row_gains=...)``) and refit the gains."""
    descent_sweeps: int = DEFAULT_DESCENT_SWEEPS
    """Sweeps of coordinate descent over the codes' columns after GPTQ's pass, on the same weighted objective
    (``nested_codes(descent_sweeps=...)``); 0 keeps GPTQ's codes."""
    end_to_end_steps: int = 0
    """Steps of end-to-end tuning after the blocks (:mod:`mobiquant.calibration.end_to_end`): every linear's group
    scales, zeros and row gains trained through the whole model towards the full-precision model's next-token
    distribution, codes fixed, ``batch_size`` calibration windows per step; 0: off."""
    end_to_end_lr: float = DEFAULT_END_TO_END_LR
    """Peak learning rate of the end-to-end tuning (Adam, cosine decay to 0 over its steps)."""
    end_to_end_weights: tuple[float, ...] | None = None
    """Weight of the KL at 1, 2, ... slices in the end-to-end tuning's loss; ``None`` takes
    ``DEFAULT_END_TO_END_WEIGHTS``."""
    end_to_end_dtype: str = "float32"
    """Precision of the end-to-end tuning's matrix products: ``float32``, or ``bfloat16`` (autocast, on the CPU
    as on CUDA; the trained tensors, their gradients' sums and the loss stay float32)."""
    end_to_end_schedule: str = "all"
    """The slice counts each step of the end-to-end tuning runs: ``all`` weighted ones, or one, in turn in the
    weights' proportions (``rotate``: a step costs one forward and backward pass instead of one per count)."""
    loss_weighted_hessians: bool = True
    """Weigh each calibration token in the Hessians by its saliency, the squared gradient of the calibration
    loss at the linear's outputs (:mod:`mobiquant.calibration.saliency`); ``False``: every token alike, GPTQ's
    ``X^T X``."""
    damp: float = DEFAULT_ELASTIC_DAMP
    """GPTQ's dampening: ``damp * mean(diag H)`` added to the Hessian's diagonal before it is inverted. Above
    GPTQ's customary 0.01 by default: nested codes fitted to one corpus's Hessian too closely lose on others
    (docs/quality.md has the sweep)."""
    precision_weights: tuple[float, ...] | None = None
    """Weight of the output error at 1, 2, ... slices that the compensated codes minimise (at most 4 slices
    weighted; a control weighs only its own); ``None`` takes ``DEFAULT_PRECISION_WEIGHTS``."""
    module_precision_weights: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """Per-linear ``precision_weights``, keyed by the linear's name in the block (``self_attn.v_proj``) or its
    last part (``v_proj``), added to ``DEFAULT_MODULE_PRECISION_WEIGHTS`` (a name given here wins); linears
    named by neither take ``precision_weights``."""
    module_clip_search_weights: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """Per-linear ``clip_search_weights``, keyed as ``module_precision_weights``, added to
    ``DEFAULT_MODULE_CLIP_SEARCH_WEIGHTS``."""
    mode: str = "parallel"
    compute_dtype: str = "float32"
    """Precision of the block's matrix products: ``float32``; on CUDA also ``tfloat32`` or ``bfloat16`` (autocast)."""
    seed: int = 0
    target_bits: float | None = None
    """Set for a single-precision control: clipping trained for ``target_bits / 2`` slices, no router."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_types()
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        check_num_slices(self.num_slices)
        if self.target_bits is not None and self.target_bits not in [2.0 * k for k in range(1, self.num_slices + 1)]:
            raise ValueError(f"a control's target_bits must be an even number of bits in 2..{2 * self.num_slices}")
        if min(self.epochs_stage1, self.epochs_stage2) < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
        if self.router_hidden < 0:
            raise ValueError(f"router_hidden must be >= 0 (0: no routers), got {self.router_hidden}")
        for option in ("gain_aware_passes", "descent_sweeps"):
            if getattr(self, option) < 0:
                raise ValueError(f"{option} must be a whole number >= 0, got {getattr(self, option)!r}")
        if self.end_to_end_steps < 0:
            raise ValueError(f"end_to_end_steps must be a whole number >= 0, got {self.end_to_end_steps!r}")
        if not 0.0 < self.end_to_end_lr < math.inf:
            raise ValueError(f"end_to_end_lr must be a positive number, got {self.end_to_end_lr!r}")
        if self.end_to_end_dtype not in END_TO_END_DTYPES:
            raise ValueError(f"end_to_end_dtype must be one of {END_TO_END_DTYPES}, got {self.end_to_end_dtype!r}")
        if self.end_to_end_schedule not in END_TO_END_SCHEDULES:
            raise ValueError(f"end_to_end_schedule must be one of {END_TO_END_SCHEDULES}, "
                             f"got {self.end_to_end_schedule!r}")
        if self.row_gain_slices < 0:
            raise ValueError(f"row_gain_slices must be >= 0, got {self.row_gain_slices!r}")
        # Gains at 1..row_gain_slices slices: a checkpoint with fewer slices fits them at every slice it has.
        object.__setattr__(self, "row_gain_slices", min(self.row_gain_slices, self.num_slices))
        if not 0.0 < self.damp <= MAX_DAMP:
            raise ValueError(f"damp must be in (0, {MAX_DAMP:g}], got {self.damp!r}")
        for option in ("clip_search_weights", "precision_weights", "end_to_end_weights"):
            if getattr(self, option) is not None:
                object.__setattr__(self, option, self._checked(option, getattr(self, option)))
        for option in ("module_clip_search_weights", "module_precision_weights"):
            checked = {str(name): self._checked(f"{option}[{name!r}]", weights)
                       for name, weights in getattr(self, option).items()}
            object.__setattr__(self, option, checked)
        if self.error_compensation and (self.target_bits or 0) > 2 * MAX_COMPENSATED_SLICES:
            raise ValueError(f"error-compensated codes reach at most {2 * MAX_COMPENSATED_SLICES} bits; a control "
                             f"at {self.target_bits} bits needs error_compensation=False")

    def _check_types(self) -> None:
        """Every scalar option of the type it is declared with (an int is a float; a bool is not a number)."""
        for option in fields(self):
            declared, _, optional = option.type.partition(" | ")
            allowed = _SCALAR_TYPES.get(declared)
            value = getattr(self, option.name)
            if allowed is None or (value is None and optional == "None"):
                continue
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise TypeError(f"{option.name} must be {_TYPE_NAMES[declared]}, got {value!r}")

    def _checked(self, option: str, weights: tuple[float, ...]) -> tuple[float, ...]:
        """``weights`` as floats: one per slice count, non-negative, not all zero, none past 8-bit codes."""
        values = tuple(float(w) for w in weights)
        if len(values) != self.num_slices or not all(0 <= w < math.inf for w in values) or max(values) <= 0:
            raise ValueError(f"{option} needs {self.num_slices} finite non-negative weights, not all zero; "
                             f"got {list(values)}")
        if option.endswith("precision_weights") and any(values[MAX_COMPENSATED_SLICES:]):
            raise ValueError(f"{option} may weigh at most {MAX_COMPENSATED_SLICES} slices (8-bit codes); "
                             f"got {list(values)}")
        return values

    def compensation_objective(self, linear: str = "") -> dict[int, float]:
        """Slice count -> weight of its output error in the compensated codes' objective of ``linear``."""
        per_linear = {**self._fitted(DEFAULT_MODULE_PRECISION_WEIGHTS), **self.module_precision_weights}
        return self._objective(_for_linear(per_linear, linear, self.precision_weights), DEFAULT_PRECISION_WEIGHTS)

    def clip_objective(self, linear: str = "") -> dict[int, float]:
        """Slice count -> weight of its output error in the clip search of ``linear``."""
        per_linear = {**self._fitted(DEFAULT_MODULE_CLIP_SEARCH_WEIGHTS), **self.module_clip_search_weights}
        return self._objective(_for_linear(per_linear, linear, self.clip_search_weights), DEFAULT_CLIP_SEARCH_WEIGHTS)

    def end_to_end_objective(self) -> dict[int, float]:
        """Slice count -> weight of its KL in the end-to-end tuning's loss (a control: its own count alone; where the
        default weighs no slice count held, the finest)."""
        objective = self._objective(self.end_to_end_weights, DEFAULT_END_TO_END_WEIGHTS)
        return objective or {self.num_slices: 1.0}

    def end_to_end_settings(self) -> dict[str, Any]:
        """What the end-to-end stage's result depends on beyond the block results: its options, the weights it
        resolves to, the batch and the seed drawing the batches."""
        return {**{option: getattr(self, option) for option in END_TO_END_OPTIONS},
                "objective": self.end_to_end_objective(), "batch_size": self.batch_size, "seed": self.seed}

    def _fitted(self, defaults: Mapping[str, tuple[float, ...]]) -> dict[str, tuple[float, ...]]:
        """Default weights cut or padded with zeros to ``num_slices`` (those weighing no slice left out)."""
        fitted = {name: (weights + (0.0,) * self.num_slices)[: self.num_slices] for name, weights in defaults.items()}
        return {name: weights for name, weights in fitted.items() if any(weights)}

    def check_linear_names(self, arch: Architecture) -> None:
        """Refuse per-linear weights naming no quantized linear of ``arch`` (a typo would silently do nothing)."""
        names = {*self.module_precision_weights, *self.module_clip_search_weights}
        unknown = sorted(name for name in names if not any(_names(linear, name) for linear in arch.linears))
        if unknown:
            raise ValueError(f"per-linear weights name {', '.join(map(repr, unknown))}, which is not a quantized "
                             f"linear of {arch.name} blocks ({', '.join(summarize_linears(arch.linears))})")

    def _objective(self, weights: tuple[float, ...] | None, defaults: tuple[float, ...]) -> dict[int, float]:
        """A control weighs only its own slice count; the elastic checkpoint ``weights`` (or ``defaults``)."""
        if self.target_bits is not None:
            return {int(self.target_bits // 2): 1.0}
        chosen = weights or (defaults + (0.0,) * self.num_slices)[: self.num_slices]
        return {k: w for k, w in enumerate(chosen, start=1) if w > 0}

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
        """Hash of every setting that changes a block's result (its resume key, with model sha and block); the
        end-to-end options change only the model assembled afterwards (:meth:`model_digest`)."""
        blocks = {k: v for k, v in self.to_dict().items() if k not in END_TO_END_OPTIONS}
        keyed = {**blocks, "algorithm_revision": ALGORITHM_REVISION}
        return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]

    def model_digest(self) -> str:
        """Hash of every setting that changes the finished model: the blocks' and the end-to-end stage's (the
        blocks' alone, :meth:`digest`, where the stage is off)."""
        if not self.end_to_end_steps:
            return self.digest()
        keyed = {"blocks": self.digest(), "end_to_end": self.end_to_end_settings()}
        return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def _names(linear: str, name: str) -> bool:
    """Whether ``name`` names the block's ``linear``: its full dotted name or its last parts."""
    return linear == name or linear.endswith("." + name)


def _for_linear(
    per_linear: Mapping[str, tuple[float, ...]], linear: str, default: tuple[float, ...] | None
) -> tuple[float, ...] | None:
    """The weights ``per_linear`` gives ``linear`` (the longest matching name wins), else ``default``."""
    matches = sorted((name for name in per_linear if _names(linear, name)), key=len)
    return per_linear[matches[-1]] if matches else default


def precision_weight_tuple(weights: Mapping[int, float], num_slices: int) -> tuple[float, ...]:
    """``precision_weights`` from ``{slice count: weight}`` (CLI ``1:4,2:1``); missing counts weigh 0."""
    outside = sorted(k for k in weights if not 1 <= k <= num_slices)
    if outside:
        raise ValueError(f"precision weights name slice counts {outside} outside 1..{num_slices}")
    return tuple(float(weights.get(k, 0.0)) for k in range(1, num_slices + 1))


def linear_weight_tuples(
    per_linear: Mapping[str, Mapping[int, float]], num_slices: int
) -> dict[str, tuple[float, ...]]:
    """``module_precision_weights`` (or ``module_clip_search_weights``) from ``{linear: {slice count: weight}}``."""
    return {name: precision_weight_tuple(weights, num_slices) for name, weights in per_linear.items()}


def quantization_config(
    config: CalibrationConfig, arch: Architecture, provenance: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``quantization_config`` entry of a MoBiQuant checkpoint's ``config.json``: the one builder.

    ``provenance`` (``source_model``, ``calibration_data``) comes from the capture manifest, so the CLI and the
    pipeline record the same facts about where a checkpoint came from.
    """
    return {
        "quant_method": "mobiquant",
        "format": FORMAT,
        "num_slices": config.num_slices,
        "group_size": config.group_size,
        "router_hidden": config.router_hidden if config.routed else 0,
        "blocks": arch.blocks,
        "linears": list(arch.linears),
        "calibration": {k: v for k, v in config.to_dict().items() if k not in ("num_slices", "group_size")},
        **dict(provenance or {}),
    }
