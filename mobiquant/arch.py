"""Architectures as data: where a model's transformer blocks are and which of their linears to quantize.

Running a block needs no per-family code: the keyword arguments the model passes to each block (attention
mask, rotary position embeddings, ...) are captured from one forward pass and replayed to that block
(:class:`mobiquant.streaming.BlockKwargs`).

Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) hold their experts in transformers 5 as one module of
stacked weights (``gate_up_proj`` ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``), not ``nn.Linear`` modules. Their
description names that module (:class:`FusedExperts`) and :func:`linearize_experts` replaces it, in every path that
builds or loads a model, by :class:`LinearExperts`: one ``nn.Linear`` per expert and projection
(``mlp.experts.<e>.gate_proj``, ``up_proj``, ``down_proj``), same routing inputs, same outputs. The router (``gate``)
stays at full precision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mobiquant.layers import served_rows, serving_rows


class UnsupportedArchitectureError(ValueError):
    """The model's family has no description here."""


@dataclass(frozen=True)
class FusedExperts:
    """A family's experts module in transformers 5: stacked expert weights, looped over the hit experts.

    ``gate_up`` is ``[E, 2I, H]`` (the gate projection's rows, then the up projection's), ``down`` ``[E, H, I]``;
    an expert computes ``down(act(gate(x)) * up(x))`` with the module's ``act_fn``.
    """

    path: str
    """Dotted path, inside one block, of the experts module (``mlp.experts``)."""
    count: str
    """The config attribute giving the number of experts (``num_local_experts``, ``num_experts``)."""
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    """Names of each expert's linears once linearised: gate, up, down."""


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    blocks: str
    """Dotted path from the causal-LM module to the ``nn.ModuleList`` of transformer blocks."""
    linears: tuple[str, ...]
    """Dotted paths, inside one block, of the ``nn.Linear`` modules to quantize (with ``experts``: once
    :meth:`for_config` has resolved the number of experts, each expert's linears too)."""
    experts: FusedExperts | None = None
    kept: tuple[str, ...] = ()
    """``nn.Linear`` modules of a block left at full precision on purpose (a gate, as the experts' router)."""
    stored_names: tuple[tuple[str, str], ...] = ()
    """``(pattern, replacement)`` regular expressions from the tensor names of the family's released files to the
    linearised model's names (Mixtral's ``block_sparse_moe.experts.<e>.w1`` is ``mlp.experts.<e>.gate_proj``)."""
    num_experts: int = 0
    """Set by :meth:`for_config`: 0 in the family's description."""

    def for_config(self, config: Any) -> Architecture:
        """This description for one model: with experts, their linears listed (``mlp.experts.<e>.down_proj``)."""
        if self.experts is None or self.num_experts:
            return self
        count = int(getattr(config, self.experts.count))
        names = tuple(f"{self.experts.path}.{e}.{p}" for e in range(count) for p in self.experts.projections)
        return dataclasses.replace(self, linears=(*self.linears, *names), num_experts=count)

    def stored_name(self, name: str) -> str:
        """The model's name for a tensor stored under ``name`` in a source's files."""
        for pattern, replacement in self.stored_names:
            name = re.sub(pattern, replacement, name)
        return name

    def fused_source(self, name: str) -> tuple[str, int, int | None] | None:
        """Where an expert linear's weight ``name`` lies in files holding the stacked layout: the stacked tensor's
        name, the expert, and which half of its rows (0 gate, 1 up; None: all, the down projection); None for any
        other tensor."""
        if self.experts is None:
            return None
        path, (gate, up, down) = re.escape(self.experts.path), self.experts.projections
        found = re.fullmatch(rf"(.*\.{path})\.(\d+)\.({gate}|{up}|{down})\.weight", name)
        if found is None:
            return None
        prefix, expert, projection = found.group(1), int(found.group(2)), found.group(3)
        if projection == down:
            return f"{prefix}.{self.experts.down}", expert, None
        return f"{prefix}.{self.experts.gate_up}", expert, 0 if projection == gate else 1

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def block_prefix(self, index: int) -> str:
        """State-dict prefix of block ``index`` (``model.layers.3.``)."""
        return f"{self.blocks}.{index}."

    def quantized_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        if self.experts is not None:
            if not self.num_experts:
                raise ValueError(f"the {self.name} description lists no experts: use for_config(model.config)")
            if not isinstance(block.get_submodule(self.experts.path), LinearExperts):
                raise ValueError(f"{self.experts.path} of this {self.name} block holds stacked experts: "
                                 "run linearize_experts on the model first")
        return {name: block.get_submodule(name) for name in self.linears}

    def linearize(self, model: nn.Module) -> nn.Module:
        """:func:`linearize_experts` with this description (nothing to do for a dense family)."""
        return linearize_experts(model, self)


_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_LLAMA_LINEARS = (
    *_ATTENTION,
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="llama",
        model_types=("llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite",
                     "olmo2", "smollm3", "stablelm", "cohere", "exaone4"),
        blocks="model.layers",
        linears=_LLAMA_LINEARS,
    ),
    Architecture(
        name="phi3",
        model_types=("phi3",),
        blocks="model.layers",
        linears=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    ),
    Architecture(
        name="glm4",
        model_types=("glm4",),
        blocks="model.layers",
        linears=(*_ATTENTION, "mlp.gate_up_proj", "mlp.down_proj"),
    ),
    Architecture(
        name="starcoder2",
        model_types=("starcoder2",),
        blocks="model.layers",
        linears=(*_ATTENTION, "mlp.c_fc", "mlp.c_proj"),
    ),
    Architecture(
        name="mixtral",
        model_types=("mixtral",),
        blocks="model.layers",
        linears=_ATTENTION,
        experts=FusedExperts(path="mlp.experts", count="num_local_experts"),
        # The released files keep Mixtral's original names (transformers renames them on load and back on save).
        stored_names=((r"\.block_sparse_moe\.", ".mlp."), (r"(\.experts\.\d+)\.w1\.", r"\1.gate_proj."),
                      (r"(\.experts\.\d+)\.w3\.", r"\1.up_proj."), (r"(\.experts\.\d+)\.w2\.", r"\1.down_proj.")),
    ),
    Architecture(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        blocks="model.layers",
        linears=_ATTENTION,
        experts=FusedExperts(path="mlp.experts", count="num_experts"),
    ),
    Architecture(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        blocks="model.layers",
        # The shared expert is a dense MLP beside the routed ones, seen by every token; its one-output gate
        # (sigmoid(shared_expert_gate(x)) scales it) is a router, kept at full precision like ``mlp.gate``.
        linears=(*_ATTENTION, "mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                 "mlp.shared_expert.down_proj"),
        experts=FusedExperts(path="mlp.experts", count="num_experts"),
        kept=("mlp.shared_expert_gate",),
    ),
    Architecture(
        name="opt",
        model_types=("opt",),
        blocks="model.decoder.layers",
        linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    ),
)


class LinearExpert(nn.Module):
    """One expert as three ``nn.Linear`` modules: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, projections: tuple[str, str, str], gate: nn.Linear, up: nn.Linear, down: nn.Linear,
                 act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.projections = projections
        for name, linear in zip(projections, (gate, up, down), strict=True):
            self.add_module(name, linear)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.projections)
        return down(self.act_fn(gate(x)) * up(x))


class LinearExperts(nn.ModuleList):
    """A stacked experts module with one :class:`LinearExpert` per expert: same call, same outputs.

    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``: each hit expert runs on the tokens
    routed to it and its outputs, scaled by their routing weights, are added into the result, as the transformers
    module's own loop does. An expert's tokens are taken in token order (the transformers loop takes them by
    routing rank first), so the rows each linear sees do not depend on how the tokens were batched.
    """

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index).tolist()
        for expert in hit:
            # An index outside the experts (expert parallelism's "not here") is skipped, as transformers does.
            if not 0 <= expert < len(self):
                continue
            token_idx, top_k_pos = torch.where(top_k_index == expert)
            # A metered pass counts the expert's real tokens only (mobiquant.layers.serving_rows).
            with serving_rows(token_idx, len(hidden_states)):
                out = self[expert](hidden_states[token_idx])
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


# Set inside counting_expert_tokens: where the tokens of the experts module's current call start among the tokens of
# all its calls since entering.
_CALL_START: ContextVar[dict[str, int] | None] = ContextVar("mobiquant_expert_call_start", default=None)


@contextlib.contextmanager
def counting_expert_tokens(block: nn.Module) -> Iterator[None]:
    """Number the tokens ``block``'s experts module is called with, for :func:`expert_token_positions`.

    Token ``t`` of a call is ``t`` plus the tokens of the earlier calls since entering: the position of the token in
    the flattened inputs of all the calls, whatever their batching, so a saliency pass and a Hessian pass that batch
    the same samples differently number each token alike. Hooks on the experts module only while inside: inference
    pays nothing.
    """
    experts = [module for module in block.modules() if isinstance(module, LinearExperts)]
    if len(experts) > 1:
        # One count of tokens per block: two experts modules would number their calls over each other's.
        raise ValueError(f"a block with {len(experts)} experts modules: token positions need one")
    count = {"start": 0, "end": 0}

    def new_call(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        count["start"], count["end"] = count["end"], count["end"] + len(hidden)

    handles = [module.register_forward_pre_hook(new_call, with_kwargs=True) for module in experts]
    token = _CALL_START.set(count)
    try:
        yield
    finally:
        _CALL_START.reset(token)
        for handle in handles:
            handle.remove()


def expert_token_positions() -> torch.Tensor | None:
    """From a hook of an expert's linear inside :func:`counting_expert_tokens`: the positions of the tokens its rows
    are (increasing, on the rows' device); None for any other module or outside."""
    count, served = _CALL_START.get(), served_rows()
    if count is None or served is None:
        return None
    return served[0] + count["start"]


def _linear(weight: torch.Tensor, requires_grad: bool) -> nn.Linear:
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
    return linear


def linearize_experts(model: nn.Module, arch: Architecture) -> nn.Module:
    """Replace, in every block of ``model``, the stacked experts module by :class:`LinearExperts` (in place).

    Works on a model being built on the meta device. Idempotent; a dense family is returned untouched. A block
    without the experts module (Qwen MoE's dense layers: ``mlp_only_layers``, ``decoder_sparse_step``) is refused.
    """
    layout = arch.experts
    if layout is None:
        return model
    for index, block in enumerate(arch.block_list(model)):
        try:
            fused = block.get_submodule(layout.path)
        except AttributeError:
            fused = None
        if isinstance(fused, LinearExperts):
            continue
        gate_up = getattr(fused, layout.gate_up, None)
        down = getattr(fused, layout.down, None)
        if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
            raise UnsupportedArchitectureError(
                f"block {index} of this {arch.name} model has no stacked experts at {layout.path} (a dense MLP "
                "layer, e.g. mlp_only_layers or decoder_sparse_step > 1): models mixing dense and MoE layers are "
                "not supported"
            )
        if getattr(fused, "has_bias", False) or not getattr(fused, "is_concatenated", True) or getattr(
                fused, "is_transposed", False):
            raise UnsupportedArchitectureError(f"{arch.name} experts at {layout.path} are not laid out as "
                                               "[E, 2I, H] gate-then-up and [E, H, I] down without bias")
        half = gate_up.shape[1] // 2
        experts = []
        for e in range(gate_up.shape[0]):
            gate = _linear(gate_up[e, :half], gate_up.requires_grad)
            up = _linear(gate_up[e, half:], gate_up.requires_grad)
            experts.append(LinearExpert(layout.projections, gate, up, _linear(down[e], down.requires_grad),
                                        fused.act_fn))
        block.set_submodule(layout.path, LinearExperts(experts))
    return model


# An expert's linear: the experts' path, the expert's index, the projection (``mlp.experts.5.down_proj``).
EXPERT_LINEAR = re.compile(r"(.*experts)\.(\d+)\.(.+)")


def summarize_linears(names: Iterable[str]) -> list[str]:
    """Linear names with each run of experts folded: ``mlp.experts.<0-7>.gate_proj/up_proj/down_proj`` stands for
    8 experts' three linears (a 128-expert model lists 384 names otherwise)."""
    out: list[str] = []
    experts: dict[str, tuple[set[int], list[str]]] = {}
    for name in names:
        found = EXPERT_LINEAR.fullmatch(name)
        if found is None:
            out.append(name)
            continue
        path = found.group(1)
        if path not in experts:
            experts[path] = (set(), [])
            out.append(path)
        indices, projections = experts[path]
        indices.add(int(found.group(2)))
        if found.group(3) not in projections:
            projections.append(found.group(3))
    return [f"{name}.<{_ranges(experts[name][0])}>.{'/'.join(experts[name][1])}" if name in experts else name
            for name in out]


def _ranges(indices: set[int]) -> str:
    """``{0, 1, 2, 3, 6}`` -> ``0-3,6``."""
    parts: list[str] = []
    for index in sorted(indices):
        if parts and index - 1 in indices:
            parts[-1] = f"{parts[-1].split('-')[0]}-{index}"
        else:
            parts.append(str(index))
    return ",".join(parts)


def fold_experts(names: Iterable[str]) -> dict[str, str]:
    """Each linear name -> itself, or for an expert's linear the name standing for that projection of every
    expert (``mlp.experts.5.down_proj`` -> ``mlp.experts.<0-7>.down_proj``)."""
    names = list(names)
    last: dict[str, int] = {}
    for name in names:
        found = EXPERT_LINEAR.fullmatch(name)
        if found is not None:
            last[found.group(1)] = max(last.get(found.group(1), 0), int(found.group(2)))
    # A model of one expert has no range to write: <0>, not <0-0>.
    span = {path: f"0-{top}" if top else "0" for path, top in last.items()}
    return {name: re.sub(r"^(.*experts)\.\d+\.", lambda m: f"{m.group(1)}.<{span[m.group(1)]}>.", name)
            for name in names}


def architecture_of(config: Any) -> Architecture:
    """The description of the model ``config`` describes, with its experts listed (:meth:`Architecture.for_config`)."""
    return architecture_for(config.model_type).for_config(config)


def architecture_for(model_type: str) -> Architecture:
    """The description of ``model_type`` (a ``config.model_type``), or a clear error."""
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    supported = ", ".join(t for a in ARCHITECTURES for t in a.model_types)
    raise UnsupportedArchitectureError(f"unsupported architecture {model_type!r}; supported: {supported}")
