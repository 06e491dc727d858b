"""Tiny random causal LMs of every supported family, and MoBiQuant versions of them, built in a test."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

from mobiquant.arch import architecture_of
from mobiquant.checkpoint import mobi_layers, replace_linears
from mobiquant.slicing import slice_weight

VOCAB = 128
GROUP = 32
SLICES = 4
ROUTER = 16

_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


# Sliding-window families: one sliding layer, then one full-attention layer, with a window shorter than the test
# sequences, so the two layers get different attention masks (and Gemma 3 different rotary embeddings).
SLIDING = 8
_MIXED = dict(sliding_window=SLIDING, layer_types=["sliding_attention", "full_attention"])
# The families described like Llama (same linears at model.layers) and those of their own; each with what it needs
# beyond _DECODER: a head size that fits the hidden size, token ids inside the tiny vocabulary, mixed layers.
_SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_MORE_FAMILIES: dict[str, dict] = {
    "qwen3": dict(head_dim=16, use_sliding_window=True, **_MIXED),
    "gemma": dict(head_dim=16, **_SPECIAL_IDS),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, **_MIXED, **_SPECIAL_IDS),
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16, **_MIXED, **_SPECIAL_IDS),
    "granite": dict(**_SPECIAL_IDS),
    "olmo2": dict(**_SPECIAL_IDS),
    "smollm3": dict(use_sliding_window=True, **_MIXED, **_SPECIAL_IDS),
    "ministral": dict(head_dim=16, **_MIXED, **_SPECIAL_IDS),
    "exaone4": dict(**_MIXED, **_SPECIAL_IDS),
    "stablelm": dict(use_qkv_bias=True, **_SPECIAL_IDS),
    "cohere": dict(**_SPECIAL_IDS),
    "phi3": dict(**_SPECIAL_IDS),
    "glm4": dict(head_dim=16, **_SPECIAL_IDS),
    "starcoder2": dict(**_SPECIAL_IDS),
}
MORE_FAMILIES = tuple(_MORE_FAMILIES)
# Mixture-of-experts families: 4 experts, 2 per token (Qwen2-MoE with its shared expert); expert widths that the
# test group size splits.
EXPERTS = 4
_MOE = dict(num_experts_per_tok=2, **_SPECIAL_IDS)
_MOE_FAMILIES: dict[str, dict] = {
    "mixtral": dict(num_local_experts=EXPERTS, **_MOE),
    "qwen3_moe": dict(num_experts=EXPERTS, moe_intermediate_size=64, head_dim=16, **_MOE),
    "qwen2_moe": dict(num_experts=EXPERTS, moe_intermediate_size=64, shared_expert_intermediate_size=96, **_MOE),
}
MOE_FAMILIES = tuple(_MOE_FAMILIES)


def tiny_config(family: str) -> PretrainedConfig:
    if family in _MORE_FAMILIES:
        return AutoConfig.for_model(family, **_DECODER, **_MORE_FAMILIES[family])
    if family in _MOE_FAMILIES:
        return AutoConfig.for_model(family, **_DECODER, **_MOE_FAMILIES[family])
    if family == "llama":
        return LlamaConfig(**_DECODER, tie_word_embeddings=True)
    if family == "mistral":
        return MistralConfig(**_DECODER, sliding_window=None)
    if family == "qwen2":
        # Qwen2 has biases on q/k/v but not on o_proj: a check that bias presence is kept per layer.
        return Qwen2Config(**_DECODER)
    if family == "opt":
        return OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=64,
        )
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    # Random init leaves biases at zero; give them values so a dropped bias would show in the outputs.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.1)
    return model


def quantize_tiny(model: PreTrainedModel, seed: int = 0, router_hidden: int | None = ROUTER) -> PreTrainedModel:
    """Replace the model's quantized linears by MoBiLinear layers holding their sliced weights, with random row
    gains, random routers and a random (increasing) threshold table, so that every stored tensor matters (a
    mixture of experts' experts are linearised first, in place)."""
    arch = architecture_of(model.config)
    arch.linearize(model)
    originals = {
        f"{arch.block_prefix(i)}{name}": (linear.weight.detach().clone(), linear.bias)
        for i, block in enumerate(arch.block_list(model))
        for name, linear in arch.quantized_linears(block).items()
    }
    replace_linears(model, arch, SLICES, GROUP, router_hidden)
    gen = torch.Generator().manual_seed(seed)
    for name, layer in mobi_layers(model).items():
        weight, bias = originals[name]
        sliced = slice_weight(weight, GROUP, SLICES)
        sliced.gains = (0.8 + 0.4 * torch.rand(SLICES, layer.out_features, generator=gen)).half()
        layer.load_sliced(sliced, bias)
        if layer.router is not None:
            with torch.no_grad():
                for param in layer.router.parameters():
                    param.copy_(torch.randn(param.shape, generator=gen))
        # Thresholds on ordered scores lie in [0, SLICES - 1] and fall as the budget grows.
        layer.thresholds = (SLICES - 1) * torch.rand(layer.thresholds.shape, generator=gen).sort(descending=True).values
    return model.eval()


def set_uniform(model: nn.Module, slices: int | None, threshold: float = 1.5) -> None:
    """Every layer at ``slices`` slices, or routed at ``threshold`` on ordered scores when ``slices`` is None."""
    for layer in mobi_layers(model).values():
        layer.uniform_slices = slices
        layer.threshold = threshold


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits
