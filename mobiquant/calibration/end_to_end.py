"""End-to-end tuning of the group parameters with the codes fixed (EfficientQAT's E2E-QP on MoBiSlice).

The block-wise calibration fits each block to its own outputs; what one block's error does to the next
blocks and to the next-token distribution is seen by none of them. This stage, after the blocks, trains every
quantized linear's group scales and zeros and its row gains through the whole model, so that the
quantized model's next-token distribution at each weighted slice count matches the full-precision model's.
Codes, routers and the format do not change (the kernels read tuned values as they read calibrated ones);
the router thresholds are fitted afterwards, on the tuned weights.

Per linear, three tensors are trained, all starting at zero (a run of no steps changes nothing):

* ``log_scale``, ``[out, groups]``: the group's scale becomes ``s * exp(log_scale)``;
* ``zero_shift``, ``[out, groups]``: its zero becomes ``z + zero_shift`` (in base-slice code units);
* ``log_gain``, ``[K, out]``: the row gain at ``k`` slices becomes ``g_k * exp(log_gain[k - 1])``.

The loss is ``sum_k w_k KL(p || q_k)``, with ``p`` the full-precision model's next-token distribution and
``q_k`` the quantized model's with every linear at ``k`` slices, averaged over the calibration positions.
A step runs every weighted slice count, or (``end_to_end_schedule="rotate"``) one count in turn
(:func:`step_objectives`).
The teacher is stored as each position's ``top_k`` most likely tokens and their log-probabilities: ``p`` and
``q_k`` are compared on those ``top_k`` tokens and one bucket for the rest of the vocabulary (:func:`coarse_kl`,
the full KL when ``top_k`` covers the vocabulary, a lower bound otherwise), so a 128k-vocabulary teacher over
thousands of sequences takes megabytes, not gigabytes. The teacher's last hidden states come from the capture
(the last block run on its captured full-precision inputs), so the full-precision model is never loaded whole.

Resumable: the trained tensors and Adam's moments are saved under the stage's folder every
``SAVE_EVERY_SECONDS`` and at the end, keyed by the block results, the samples and the settings; a finished
stage is read back, an interrupted one goes on from its last saved step with the same batches.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from mobiquant.calibration.capture import block_outputs
from mobiquant.calibration.config import CalibrationConfig
from mobiquant.calibration.store import (
    KWARGS_FILE,
    atomic_save,
    fp_input_path,
    load_block_kwargs,
    load_hidden,
    read_manifest,
    readable_metadata,
)
from mobiquant.layers import MoBiLinear
from mobiquant.model_files import BlockSource
from mobiquant.slicing import BITS_PER_SLICE, PARAM_DTYPE, SlicedWeight, affine_codes, group_step_offset
from mobiquant.streaming import block_returns_tuple, head_logits

TEACHER_FILE = "teacher.safetensors"
# Teacher tokens kept per position: the KL is taken over them and one bucket for the rest of the vocabulary.
TEACHER_TOP_K = 64
STATE_FILE = "state.safetensors"
# Part of the stage's key: bump it when a change to this module changes what the stage computes.
STAGE_REVISION = 1
# A save writes the trained tensors and two Adam moments (three times the group parameters): a few GB on a 70B
# model, so not after every step.
SAVE_EVERY_SECONDS = 120.0


def coarse_kl(student_logits: torch.Tensor, top_log_probs: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(p || q)`` on the teacher's top tokens and one bucket for the rest.

    ``student_logits``: ``[..., vocab]``; ``top_log_probs`` and ``top_indices``: ``[..., top_k]``, the teacher's
    log-probabilities of its ``top_k`` most likely tokens (log-softmax over the whole vocabulary). Both
    distributions are coarsened to those tokens plus "any other token"; the KL of coarsened distributions never
    exceeds the full KL and equals it when ``top_k`` is the vocabulary.
    """
    logits = student_logits.float()
    teacher = top_log_probs.float()
    top_logits = logits.gather(-1, top_indices)
    top_lse = torch.logsumexp(top_logits, dim=-1, keepdim=True)
    if top_indices.shape[-1] >= logits.shape[-1]:
        return _coarse_kl_terms(teacher, top_logits - top_lse, None).mean()
    # The rest's log-sum from the logits outside the top tokens, not as log(1 - top mass): no cancellation where the
    # top tokens hold nearly all the mass. The whole log-sum follows from the two parts, with no log-softmax over
    # the vocabulary kept for the backward pass.
    rest_lse = torch.logsumexp(logits.scatter(-1, top_indices, -math.inf), dim=-1, keepdim=True)
    lse = torch.logaddexp(top_lse, rest_lse)
    return _coarse_kl_terms(teacher, top_logits - lse, rest_lse - lse).mean()


def _coarse_kl_terms(teacher: torch.Tensor, top_log_q: torch.Tensor, rest_log_q: torch.Tensor | None) -> torch.Tensor:
    """The coarse KL per position from the teacher's top log-probabilities and the student's (``[..., top_k]``), and
    the student's log-probability of the rest (``[..., 1]``; None where the top tokens are the whole vocabulary:
    the teacher's rest is then rounding alone)."""
    top_terms = (teacher.exp() * (teacher - top_log_q)).sum(-1)
    if rest_log_q is None:
        return top_terms
    teacher_rest_prob = (1.0 - teacher.exp().sum(-1)).clamp(min=0.0)
    rest_terms = torch.where(teacher_rest_prob > 0,
                             teacher_rest_prob * (teacher_rest_prob.clamp(min=1e-30).log() - rest_log_q.squeeze(-1)),
                             torch.zeros_like(teacher_rest_prob))
    return top_terms + rest_terms


@torch.no_grad()
def _coarse_kl_and_gradient(logits: torch.Tensor, teacher: torch.Tensor,
                            top_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The coarse KL per position and its gradient in the logits (``[positions, vocab]``, float32), written out and
    made in place: the gradient is ``logits``, overwritten.

    With ``q = softmax(logits)``, ``m`` the teacher's coarse mass (1 up to rounding), ``p_R`` its rest and ``q_R``
    the student's: a top token's entry is ``m q_j - p_j``; any other's ``m q_j - p_R q_j / q_R``, computed as
    ``exp(l_j - lse_R) (m q_R - p_R)`` so that nothing divides by a vanishing ``q_R``.
    """
    top_logits = logits.gather(-1, top_indices)
    top_lse = torch.logsumexp(top_logits, dim=-1, keepdim=True)
    teacher_top_prob = teacher.exp()
    mass = teacher_top_prob.sum(-1, keepdim=True)
    if top_indices.shape[-1] >= logits.shape[-1]:
        kl = _coarse_kl_terms(teacher, top_logits - top_lse, None)
        grad = logits.zero_()
        student_top_prob = (top_logits - top_lse).exp()
    else:
        # exp(l_j - max) outside the top tokens, 0 at them: the rest's log-sum, and once scaled its gradient.
        rest_exp = logits.scatter_(-1, top_indices, -math.inf)
        rest_max = rest_exp.amax(-1, keepdim=True)
        rest_sum = rest_exp.sub_(rest_max).exp_().sum(-1, keepdim=True)
        rest_lse = rest_max + rest_sum.log()
        lse = torch.logaddexp(top_lse, rest_lse)
        kl = _coarse_kl_terms(teacher, top_logits - lse, rest_lse - lse)
        teacher_rest_prob = (1.0 - mass).clamp(min=0.0)
        mass = mass + teacher_rest_prob
        student_top_prob = (top_logits - lse).exp()
        grad = rest_exp.mul_((mass * (rest_lse - lse).exp() - teacher_rest_prob) / rest_sum)
    grad.scatter_(-1, top_indices, mass * student_top_prob - teacher_top_prob)
    return kl, grad


# Positions per chunk of the fused head and loss: this many logits over the vocabulary. On a CPU, 16 MB of float32
# stays below glibc's largest threshold for serving a buffer from the heap, where larger ones are mapped afresh and
# page-faulted at every use; on a GPU a chunk must be long enough that the head's weight, read once per chunk, is
# read a few times per pass, not hundreds.
LOGIT_CHUNK_ELEMENTS = {"cpu": 1 << 22}
LOGIT_CHUNK_ELEMENTS_DEVICE = 1 << 26


class _HeadKL(torch.autograd.Function):
    """:func:`coarse_kl` of the head's logits ``hidden @ weight.T + bias``, differentiable in ``hidden`` only, with
    the product in ``weight``'s dtype.

    The logits are made a chunk of positions at a time, into one buffer reused by every chunk, and the chunk's
    gradient in ``hidden`` is taken in the same pass (:func:`_coarse_kl_and_gradient`), so no ``[positions, vocab]``
    tensor is kept: the whole logits, their float32 copy and autograd's saved softmax would be gigabytes on a large
    vocabulary. The backward scales the stored gradient. The head is not trained.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                top_log_probs: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
        vocab, features = weight.shape
        flat = hidden.reshape(-1, features).to(weight.dtype)
        teacher = top_log_probs.reshape(len(flat), -1).float()
        indices = top_indices.reshape(len(flat), -1)
        chunk_elements = LOGIT_CHUNK_ELEMENTS.get(hidden.device.type, LOGIT_CHUNK_ELEMENTS_DEVICE)
        rows = min(len(flat), max(1, chunk_elements // vocab))
        logits_buffer = torch.empty(rows, vocab, dtype=torch.float32, device=hidden.device)
        # The product's own dtype, where it is not float32: the logits before, the gradient after the loss.
        product_buffer = None if weight.dtype == torch.float32 else torch.empty_like(logits_buffer, dtype=weight.dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty(flat.shape, dtype=torch.float32, device=hidden.device)
        # The dtypes are chosen here: autocast, where it is on, would not write into the buffers.
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, len(flat), rows):
                part = slice(start, start + rows)
                count = len(flat[part])
                logits = logits_buffer[:count]
                if product_buffer is None:
                    torch.matmul(flat[part], weight.T, out=logits)
                else:
                    logits.copy_(torch.matmul(flat[part], weight.T, out=product_buffer[:count]))
                if bias is not None:
                    logits += bias.float()
                kl, grad_logits = _coarse_kl_and_gradient(logits, teacher[part], indices[part])
                total += kl.sum()
                if product_buffer is not None:
                    grad_logits = product_buffer[:count].copy_(grad_logits)
                grad[part] = grad_logits @ weight
        ctx.save_for_backward(grad)
        ctx.positions, ctx.shape, ctx.dtype = len(flat), hidden.shape, hidden.dtype
        return total / len(flat)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return (grad * (grad_loss / ctx.positions)).view(ctx.shape).to(ctx.dtype), None, None, None, None


# --------------------------------------------------------------------------------------------------------------------
# The teacher


@torch.no_grad()
def write_teacher(source: BlockSource, capture_dir: Path, samples: torch.Tensor, out_path: Path, top_k: int,
                  device: torch.device, batch_size: int = 4) -> Path:
    """The full-precision model's top ``top_k`` next-token log-probabilities at every position of ``samples``.

    The last block runs on its captured full-precision inputs and the model's own final norm and head give the
    logits, row by row: one block and the head in memory. A file of the same capture and ``top_k`` is reused.
    """
    capture_dir, out_path = Path(capture_dir), Path(out_path)
    tag = json.dumps({"capture": _capture_tag(capture_dir), "top_k": top_k}, sort_keys=True)
    meta = readable_metadata(out_path)
    if meta is not None and meta.get("teacher") == tag:
        return out_path
    last = source.num_blocks - 1
    block_kwargs = load_block_kwargs(capture_dir / KWARGS_FILE, device).for_block(last)
    block = source.block(last, device)
    inputs = load_hidden(fp_input_path(capture_dir, last))
    outputs = block_outputs(block, inputs, block_kwargs, batch_size, torch.float32)
    returns_tuple = block_returns_tuple(block, inputs[:1].to(device).float(), block_kwargs)
    del block
    stem = source.stem(device)
    values, indices = [], []
    for row, hidden in zip(samples, outputs, strict=True):
        logits = head_logits(stem, source.arch, row, hidden.unsqueeze(0), returns_tuple)[0].double()
        top = torch.topk(torch.log_softmax(logits, dim=-1), min(top_k, logits.shape[-1]), dim=-1)
        values.append(top.values.float().cpu())
        indices.append(top.indices.cpu())
    atomic_save({"log_probs": torch.stack(values), "indices": torch.stack(indices)}, out_path, {"teacher": tag})
    return out_path


def _capture_tag(capture_dir: Path) -> str:
    manifest = read_manifest(capture_dir)
    return json.dumps({k: manifest[k] for k in ("model", "samples_sha256", "dtype", "format")}, sort_keys=True)


# --------------------------------------------------------------------------------------------------------------------
# The student


class _Scratch:
    """Buffers that every linear's weight rebuild writes into, one product at a time: on a CPU a fresh weight-sized
    tensor per product and per step is mapped afresh and page-faulted in, which costs more than the product."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A ``shape`` tensor of ``dtype`` on ``device``, uninitialised, that the next call of the same name reuses."""
        numel, key = math.prod(shape), (name, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    def codes(self, codes: torch.Tensor, shift: int) -> torch.Tensor:
        """``codes >> shift`` in float32 (exact: 8 slices are 16 bits)."""
        shifted = torch.bitwise_right_shift(codes, shift, out=self.get("codes", codes.shape, codes.dtype, codes.device))
        return self.get("codes_f32", codes.shape, torch.float32, codes.device).copy_(shifted)

    def weight(self, codes: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``affine_codes`` of float ``codes`` in ``dtype``."""
        weight = affine_codes(codes, step, offset, out=self.get("weight", codes.shape, torch.float32, codes.device))
        return weight if dtype == torch.float32 else self.get("weight", codes.shape, dtype, codes.device).copy_(weight)


class _CodesProduct(torch.autograd.Function):
    """``x @ W.T`` with ``W = offset + (codes >> shift) * step`` per group, differentiable in ``x``, ``step`` and
    ``offset``.

    Only ``x`` and the small per-group tensors are kept for the backward pass, which rebuilds ``W`` from the
    layer's codes (kept, every linear's dense weight would sit in memory until the backward: the model's size in
    float32 on top of its codes). Written out rather than left to autograd under activation checkpointing, which
    would also run the forward product a second time: a third more arithmetic in the linears. The rebuilt weights
    and the weight's gradient live in ``scratch``'s buffers.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, codes: torch.Tensor, shift: int, step: torch.Tensor,
                offset: torch.Tensor, scratch: _Scratch) -> torch.Tensor:
        # Under autocast the products run in its dtype, as a linear's would; the per-group tensors stay float32.
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        ctx.input_dtype = x.dtype
        x = x.to(dtype)
        ctx.save_for_backward(x, codes, step, offset)
        ctx.shift, ctx.scratch = shift, scratch
        return x @ scratch.weight(scratch.codes(codes, shift), step, offset, dtype).T

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, codes, step, offset = ctx.saved_tensors
        scratch = ctx.scratch
        shifted = scratch.codes(codes, ctx.shift)
        grad_out = grad_out.to(x.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ scratch.weight(shifted, step, offset, x.dtype)).to(ctx.input_dtype)
        out_features, in_features = codes.shape
        # dL/dW, summed over the group's columns against 1 and against the codes.
        grad_weight = torch.matmul(grad_out.reshape(-1, out_features).T, x.reshape(-1, in_features),
                                   out=scratch.get("grad_weight", codes.shape, x.dtype, x.device))
        if grad_weight.dtype != torch.float32:
            grad_weight = scratch.get("grad_weight", codes.shape, torch.float32, x.device).copy_(grad_weight)
        grad_weight = grad_weight.view(out_features, step.shape[1], -1)
        grad_offset = grad_weight.sum(-1, keepdim=True)
        grad_step = grad_weight.mul_(shifted.view(grad_weight.shape)).sum(-1, keepdim=True)
        return grad_x, None, None, grad_step, grad_offset, None


class TunedLinear(nn.Module):
    """A MoBiLinear run at ``slices`` with trainable multipliers of its group parameters and row gains.

    The weight is rebuilt from the layer's codes at every call (``group_step_offset`` of the tuned values), so
    gradients reach the three trained tensors; the codes and the layer itself are not changed until
    :meth:`write_back`.
    """

    def __init__(self, layer: MoBiLinear, scratch: _Scratch | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.scratch = scratch or _Scratch()
        self.slices = layer.stored_slices
        self.log_scale = nn.Parameter(torch.zeros(layer.scale.shape, device=layer.scale.device))
        self.zero_shift = nn.Parameter(torch.zeros(layer.zero.shape, device=layer.zero.device))
        self.log_gain = nn.Parameter(torch.zeros(layer.gains.shape, device=layer.gains.device))

    def tuned(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tuned scale, zero and gains, in float32."""
        layer = self.layer
        return (layer.scale.float() * self.log_scale.exp(), layer.zero.float() + self.zero_shift,
                layer.gains.float() * self.log_gain.exp())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero, gains = self.tuned()
        step, offset = group_step_offset(scale, zero, self.slices, gains[self.slices - 1])
        shift = BITS_PER_SLICE * (self.layer.stored_slices - self.slices)
        out = _CodesProduct.apply(x, self.layer.dense_codes(), shift, step, offset, self.scratch)
        if self.layer.bias is not None:
            out = out + self.layer.bias.to(out.dtype)
        return out

    @torch.no_grad()
    def write_back(self) -> None:
        """Store the tuned values in the layer, rounded to the format's float16 as calibrated values are."""
        scale, zero, gains = self.tuned()
        layer = self.layer
        layer.load_sliced(SlicedWeight(layer.planes, scale.to(PARAM_DTYPE), zero.to(PARAM_DTYPE), layer.group_size,
                                       gains.to(PARAM_DTYPE)))


@contextmanager
def tuned_linears(model: nn.Module) -> Iterator[dict[str, TunedLinear]]:
    """Every MoBiLinear of ``model`` replaced by a :class:`TunedLinear` of it, put back on leaving."""
    names = [name for name, module in model.named_modules() if isinstance(module, MoBiLinear)]
    if not names:
        raise ValueError("the model has no MoBiLinear layers to tune")
    scratch = _Scratch()
    tuned = {name: TunedLinear(model.get_submodule(name), scratch) for name in names}
    try:
        for name, wrapper in tuned.items():
            _set_submodule(model, name, wrapper)
        yield tuned
    finally:
        for name, wrapper in tuned.items():
            _set_submodule(model, name, wrapper.layer)


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """``model``'s own parameters without gradients inside (only the tuned tensors train); as they were after."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


class _HeadSlot(nn.Module):
    """Stands in the model's output embeddings during the stage. Fused (at first), it keeps the head's input and
    returns an empty tensor for the logits, which :func:`student_kl` computes with the loss; unfused, the head."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.head = head
        self.fused = True
        self.hidden: torch.Tensor | None = None
        self.placeholder: torch.Tensor | None = None
        self._weights: dict[torch.dtype, torch.Tensor] = {}

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.head(hidden)
        self.hidden = hidden
        self.placeholder = hidden[..., :0]
        return self.placeholder

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The head's weight in ``dtype``, converted once for the whole stage."""
        if dtype not in self._weights:
            self._weights[dtype] = self.head.weight.detach().to(dtype)
        return self._weights[dtype]


@contextmanager
def head_slot(model: nn.Module) -> Iterator[_HeadSlot | None]:
    """A :class:`_HeadSlot` in place of ``model``'s output embeddings, put back on leaving; None where the head is
    not a linear layer (the logits are then taken whole)."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        yield None
        return
    name = next(name for name, module in model.named_modules() if module is head)
    slot = _HeadSlot(head)
    _set_submodule(model, name, slot)
    try:
        yield slot
    finally:
        _set_submodule(model, name, head)


def student_kl(model: nn.Module, head: _HeadSlot | None, tokens: torch.Tensor, top_log_probs: torch.Tensor,
               top_indices: torch.Tensor) -> torch.Tensor:
    """:func:`coarse_kl` of ``model``'s next-token distribution on ``tokens``, with the head's product and the loss
    fused (:class:`_HeadKL`) where ``head`` is a slot and the model's logits are the head's output as is."""
    logits = model(tokens, use_cache=False).logits
    if head is not None and head.fused:
        if logits is head.placeholder:
            device_type = tokens.device.type
            autocast = torch.is_autocast_enabled(device_type)
            dtype = torch.get_autocast_dtype(device_type) if autocast else head.hidden.dtype
            bias = None if head.head.bias is None else head.head.bias.detach()
            return _HeadKL.apply(head.hidden, head.weight(dtype), bias, top_log_probs, top_indices)
        # The model changes its head's output (caps or scales the logits): they are taken whole from now on.
        head.fused = False
        logits = model(tokens, use_cache=False).logits
    return coarse_kl(logits, top_log_probs, top_indices)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# --------------------------------------------------------------------------------------------------------------------
# The stage


def stage_key(config: CalibrationConfig, block_hashes: Mapping[int, str], samples: torch.Tensor, top_k: int) -> str:
    """What the stage's result depends on: every block result, the samples, the stage's settings."""
    keyed = {"blocks": {str(i): block_hashes[i] for i in sorted(block_hashes)},
             "samples": hashlib.sha256(samples.cpu().numpy().tobytes()).hexdigest(), "top_k": top_k,
             "config": config.end_to_end_settings(), "revision": STAGE_REVISION}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def step_objectives(objective: Mapping[int, float], schedule: str, steps: int) -> list[dict[int, float]]:
    """Per step, the slice counts it runs and the weights of their KLs.

    ``all``: every count of ``objective`` at every step. ``rotate``: one count per step, chosen by smooth weighted
    round-robin (each count gains its weight per step, the one with most, ties to the fewest slices, runs and
    gives back the weights' sum), so the counts come in the weights' proportions, spread out (1 / 1 / 0.5 at 2 / 3
    / 4 slices: 2, 3, 4, 2, 3, ...); its KL weighs the weights' sum, so a step's loss has the scale of ``all``'s.
    """
    if schedule == "all":
        return [dict(objective) for _ in range(steps)]
    total = sum(objective.values())
    credit = dict.fromkeys(objective, 0.0)
    chosen = []
    for _ in range(steps):
        for k, weight in objective.items():
            credit[k] += weight
        k = max(credit, key=lambda count: (credit[count], -count))
        credit[k] -= total
        chosen.append({k: total})
    return chosen


# Called after each step with the steps done, the steps in all and the step's loss (the pipeline logs them).
StepCallback = Callable[[int, int, float], None]


def tune_end_to_end(model: nn.Module, samples: torch.Tensor, teacher_path: Path, config: CalibrationConfig,
                    stage_dir: Path, key: str, progress: bool = True,
                    on_step: StepCallback | None = None) -> dict[str, Any]:
    """Train the group parameters and row gains of ``model``'s MoBiLinear layers for ``config.end_to_end_steps``
    steps against the teacher file, then store them in the layers; resumes from ``stage_dir``.

    ``samples`` are the calibration windows the teacher was computed on (``[n, seqlen]``), ``config.batch_size``
    of them per step, in an order drawn from ``config.seed`` per pass over them. Returns a report: the loss at
    each step (those of earlier runs included), seconds, and whether the result was read back (``cached``).
    """
    steps = config.end_to_end_steps
    objectives = step_objectives(config.end_to_end_objective(), config.end_to_end_schedule, steps)
    stage_dir = Path(stage_dir)
    state_path = stage_dir / STATE_FILE
    teacher = load_file(str(teacher_path))
    if len(teacher["indices"]) != len(samples) or teacher["indices"].shape[1] != samples.shape[1]:
        raise ValueError(f"the teacher holds {tuple(teacher['indices'].shape[:2])} positions, the samples "
                         f"{tuple(samples.shape)}")
    device = next(model.parameters()).device
    autocast = config.end_to_end_dtype == "bfloat16"
    start = time.perf_counter()
    with frozen(model), tuned_linears(model) as tuned, head_slot(model) as head:
        params = {f"{name}.{part}": getattr(wrapper, part) for name, wrapper in tuned.items()
                  for part in ("log_scale", "zero_shift", "log_gain")}
        optimizer = torch.optim.Adam(params.values(), lr=config.end_to_end_lr)
        done, losses, seconds = _restore(state_path, key, params, optimizer)
        cached = done == steps
        batch_order = _batch_order(len(samples), config.batch_size, steps, config.seed)
        bar = tqdm(total=steps, initial=done, desc="end-to-end tuning", unit="step", disable=not progress)
        saved = time.perf_counter()
        for step in range(done, steps):
            for group in optimizer.param_groups:
                group["lr"] = config.end_to_end_lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
            rows = batch_order[step]
            tokens = samples[rows].to(device)
            top_log_probs, top_indices = (teacher[name][rows].to(device) for name in ("log_probs", "indices"))
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            # One backward per slice count: only one count's activations are held at a time.
            for k, weight in objectives[step].items():
                for wrapper in tuned.values():
                    wrapper.slices = k
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = weight * student_kl(model, head, tokens, top_log_probs, top_indices)
                loss.backward()
                total += float(loss.detach())
            optimizer.step()
            losses.append(total)
            bar.set_postfix(loss=f"{total:.4f}", refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(step + 1, steps, total)
            if time.perf_counter() - saved > SAVE_EVERY_SECONDS or step + 1 == steps:
                _save(state_path, key, step + 1, losses, seconds + time.perf_counter() - start, params, optimizer)
                saved = time.perf_counter()
        bar.close()
        for wrapper in tuned.values():
            wrapper.write_back()
    return {"losses": losses, "seconds": seconds + (0.0 if cached else time.perf_counter() - start),
            "steps": steps, "cached": cached}


def stage_report(stage_dir: Path) -> dict[str, Any] | None:
    """The saved stage's steps done, loss at each and seconds, or None where nothing was saved."""
    meta = readable_metadata(Path(stage_dir) / STATE_FILE)
    if meta is None:
        return None
    return {"steps": int(meta["step"]), "losses": json.loads(meta["losses"]), "seconds": float(meta["seconds"])}


def _batch_order(num_samples: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """The rows of each step: one permutation of the samples per pass, cut into batches (the last one shorter)."""
    generator = torch.Generator().manual_seed(seed)
    order: list[torch.Tensor] = []
    while len(order) < steps:
        order.extend(torch.split(torch.randperm(num_samples, generator=generator, device=generator.device), batch_size))
    return order[:steps]


def _save(path: Path, key: str, step: int, losses: list[float], seconds: float, params: dict[str, nn.Parameter],
          optimizer: torch.optim.Optimizer) -> None:
    tensors = {f"param:{name}": p.detach() for name, p in params.items()}
    for name, p in params.items():
        state = optimizer.state.get(p)
        if state:
            tensors[f"exp_avg:{name}"], tensors[f"exp_avg_sq:{name}"] = state["exp_avg"], state["exp_avg_sq"]
    atomic_save(tensors, path, {"key": key, "step": str(step), "losses": json.dumps(losses),
                                "seconds": f"{seconds:.3f}"})


def _restore(path: Path, key: str, params: dict[str, nn.Parameter],
             optimizer: torch.optim.Optimizer) -> tuple[int, list[float], float]:
    """Steps done, their losses and seconds, from a state saved under ``key`` (loaded into ``params`` and
    ``optimizer``); nothing done where there is none or it is another key's."""
    meta = readable_metadata(path)
    if meta is None or meta.get("key") != key:
        return 0, [], 0.0
    tensors = load_file(str(path))
    step = int(meta["step"])
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param:{name}"])
            if f"exp_avg:{name}" in tensors:
                optimizer.state[p] = {"step": torch.tensor(float(step)),
                                      "exp_avg": tensors[f"exp_avg:{name}"].to(p.device),
                                      "exp_avg_sq": tensors[f"exp_avg_sq:{name}"].to(p.device)}
    return step, json.loads(meta["losses"]), float(meta["seconds"])

