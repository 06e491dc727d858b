"""Architectures as data: where a model's transformer blocks are and which of their linears to quantize.

Running a block needs no per-family code: the keyword arguments the model passes to each block (attention
mask, rotary position embeddings, ...) are captured from one forward pass and replayed to that block
(:class:`mobiquant.streaming.BlockKwargs`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model's family has no description here."""


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    blocks: str
    """Dotted path from the causal-LM module to the ``nn.ModuleList`` of transformer blocks."""
    linears: tuple[str, ...]
    """Dotted paths, inside one block, of the ``nn.Linear`` modules to quantize."""

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def block_prefix(self, index: int) -> str:
        """State-dict prefix of block ``index`` (``model.layers.3.``)."""
        return f"{self.blocks}.{index}."

    def quantized_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        return {name: block.get_submodule(name) for name in self.linears}


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
        name="opt",
        model_types=("opt",),
        blocks="model.decoder.layers",
        linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    ),
)


def architecture_for(model_type: str) -> Architecture:
    """The description of ``model_type`` (a ``config.model_type``), or a clear error."""
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    supported = ", ".join(t for a in ARCHITECTURES for t in a.model_types)
    raise UnsupportedArchitectureError(f"unsupported architecture {model_type!r}; supported: {supported}")
